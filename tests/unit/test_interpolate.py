"""eval.interpolate: each point between the base (0) and the adapted model (1) is scored without writing a
model, equals what `cptkit merge` writes at that merge.scale, and the best point within the forgetting
budget is named; bad lists and a sweep with nothing to interpolate are refused before any model loads."""

from __future__ import annotations

import json

import pytest
import torch

from cptkit.commands import eval as eval_cmd
from cptkit.commands import merge
from cptkit.commands import report as report_cmd
from cptkit.config import Config, build_config
from cptkit.config.evaluate import EvalModel
from cptkit.errors import ConfigError, CptkitError
from cptkit.eval.interpolate import adapter_at_scale, plan_sweep
from cptkit.eval.tradeoff import NO_BUDGET, sweep_summary
from cptkit.testing.stages import make_lora_adapter, train_module_copies, write_prepared
from cptkit.testing.tiny import make_tiny_llama, sample_texts

SCALES = [0.0, 0.5, 1.0]


def prepared(run, tokenizer):
    texts = [t[:400] for t in sample_texts(12)]
    write_prepared(
        run / "data", {"pydocs": ("domain", texts[:4]), "prose": ("general", texts[4:8])}, tokenizer
    )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """A run folder with a LoRA adapter (a trained lm_head copy too) in train/."""
    run = tmp_path_factory.mktemp("lora-run")
    prepared(run, tiny_tokenizer)
    torch.manual_seed(0)
    train_module_copies(
        make_lora_adapter(tiny_model_dir, run / "train", scale=0.1, modules_to_save=["lm_head"])
    )
    tiny_tokenizer.save_pretrained(run / "train")
    return run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_tokenizer):
    """A run folder whose train/ holds a full model of the base's architecture (other weights)."""
    run = tmp_path_factory.mktemp("full-run")
    prepared(run, tiny_tokenizer)
    make_tiny_llama(run / "train", tokenizer=tiny_tokenizer, seed=1)
    return run


def config(run, base, **eval_opts) -> Config:
    return build_config(
        Config,
        {
            "run_dir": str(run),
            "model": {"name_or_path": str(base)},
            "eval": {"batch_size": 4, "max_documents": 2, **eval_opts},
            "merge": {"dtype": "float32"},
        },
    )


def by_model(result) -> dict[tuple[str, str], dict]:
    return {(r["model"], r["set"]): r for r in result["results"]}


def merged_at(run, base, scale) -> dict[tuple[str, str], dict]:
    """The rows of the model `cptkit merge` writes at merge.scale `scale`, scored like any model."""
    cfg = config(run, base)
    cfg.merge.scale, cfg.merge.output_dir = scale, str(run / f"merged-{scale}")
    merge.run(cfg)
    cfg.eval.models = [EvalModel(name="m", path=str(run / f"merged-{scale}"))]
    cfg.eval.output_dir = str(run / f"eval-merged-{scale}")
    return {s: r for (m, s), r in by_model(eval_cmd.run(cfg)).items() if m == "m"}


@pytest.fixture(scope="module")
def lora_sweep(lora_run, tiny_model_dir):
    return eval_cmd.run(config(lora_run, tiny_model_dir, interpolate=SCALES))


def test_lora_sweep_ends_are_the_base_and_the_adapted_model(lora_sweep):
    rows = by_model(lora_sweep)
    for s in ("pydocs", "prose"):
        assert rows[("interpolated@1", s)]["loss"] == rows[("adapted", s)]["loss"]
        assert rows[("interpolated@0", s)]["loss"] == pytest.approx(rows[("base", s)]["loss"], rel=1e-6)
        assert rows[("adapted", s)]["loss"] != pytest.approx(rows[("base", s)]["loss"], rel=1e-4)
    assert {d["model"] for d in lora_sweep["deltas"]} >= {
        "interpolated@0",
        "interpolated@0.5",
        "interpolated@1",
    }


def test_lora_sweep_point_equals_the_merge_at_that_scale(lora_run, tiny_model_dir, lora_sweep):
    rows, merged = by_model(lora_sweep), merged_at(lora_run, tiny_model_dir, 0.5)
    for s in ("pydocs", "prose"):
        point = rows[("interpolated@0.5", s)]["loss"]
        assert point == pytest.approx(merged[s]["loss"], rel=1e-5)
        assert point != pytest.approx(rows[("adapted", s)]["loss"], rel=1e-4)


def test_interpolation_block_names_the_best_point_within_the_default_budget(lora_run, lora_sweep):
    block = json.loads((lora_run / "eval/results.json").read_text())["interpolation"]
    assert block["mode"] == "lora" and block["budget"] == 0 and block["budget_from"] == NO_BUDGET
    assert [p["scale"] for p in block["points"]] == SCALES
    rows = by_model(lora_sweep)
    one = next(p for p in block["points"] if p["scale"] == 1)
    base, adapted = rows[("base", "prose")], rows[("adapted", "prose")]
    assert one["general_change"] == pytest.approx(adapted["perplexity"] / base["perplexity"] - 1, rel=1e-6)
    zero = next(p for p in block["points"] if p["scale"] == 0)
    assert zero["within_budget"] is True and abs(zero["general_change"]) < 1e-6
    within = [p for p in block["points"] if p["within_budget"]]
    assert block["best"] == min(within, key=lambda p: p["domain_change"])


def test_report_shows_the_trade_off_curve_and_table(lora_run, lora_sweep):
    report = report_cmd.run(lora_run)
    md = (lora_run / "report/report.md").read_text()
    assert "### Interpolation between base and adapted" in md and "| 0.5 |" in md
    assert report["plots"]["tradeoff"] == "tradeoff.png" and (lora_run / "report/tradeoff.png").is_file()
    assert "interpolated@" not in md.split("## Missing")[0].split("## Data")[0]  # not in the one-liners


def test_adapter_at_scale_is_restored_after(lora_run, tiny_model_dir):
    from cptkit.eval.models import load_model

    model = load_model(tiny_model_dir, torch.device("cpu"), torch.float32, adapter=lora_run / "train")
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with adapter_at_scale(model, 0.25):
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert (inside - before).abs().max() > 1e-3 and torch.equal(after, before)


def test_full_sweep_equals_the_full_merge_at_that_scale(full_run, tiny_model_dir):
    result = eval_cmd.run(config(full_run, tiny_model_dir, interpolate=[0.5, 1.0]))
    rows, merged = by_model(result), merged_at(full_run, tiny_model_dir, 0.5)
    assert result["interpolation"]["mode"] == "full"
    for s in ("pydocs", "prose"):
        assert rows[("interpolated@1", s)]["loss"] == rows[("adapted", s)]["loss"]
        assert rows[("interpolated@0.5", s)]["loss"] == pytest.approx(merged[s]["loss"], rel=1e-5)
        assert rows[("interpolated@0.5", s)]["loss"] != pytest.approx(rows[("adapted", s)]["loss"], rel=1e-4)


def rows_of(model, domain_loss, general_loss):
    return [
        {"model": model, "set": "d", "role": "domain", "loss": domain_loss, "tokens": 100},
        {"model": model, "set": "g", "role": "general", "loss": general_loss, "tokens": 100},
    ]


@pytest.mark.parametrize(
    "budget, best, why",
    [
        (0.05, 1.0, "largest domain gain"),  # every point within 5%: the largest gain
        (0.01, 0.5, "largest domain gain"),  # 1.0 forgets 3%: the best within 1% is 0.5
        (None, 0.25, "largest domain gain"),  # no budget set: 0, only the point that forgets nothing
        (-0.01, None, "no point within the budget .* at scale 0.25"),
    ],
)
def test_best_point_is_the_largest_domain_gain_within_the_budget(tmp_path, budget, best, why):
    rows = rows_of("base", 2.0, 1.5)
    rows += rows_of("interpolated@0.25", 1.9, 1.5)  # -9.5% domain, +0% general
    rows += rows_of("interpolated@0.5", 1.8, 1.505)  # -18% domain, +0.5% general
    rows += rows_of("interpolated@1", 1.6, 1.53)  # -33% domain, +3% general
    models = [EvalModel(name="base", path="b"), EvalModel(name="adapted", path="b", adapter="a")]
    block = sweep_summary(plan_sweep([1.0, 0.25, 0.5], models, budget), rows)
    assert block["budget"] == (budget or 0)
    assert block["budget_from"] == ("train.forgetting_budget" if budget is not None else NO_BUDGET)
    assert (block["best"] or {}).get("scale") == best
    import re

    assert re.search(why, block["why"])


def test_interpolate_without_an_adapted_model_is_refused_before_any_model_loads(tmp_path, tiny_model_dir):
    prepared(tmp_path / "run", __import__("transformers").AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    with pytest.raises(CptkitError, match="eval.interpolate: no model named 'adapted'"):
        eval_cmd.run(config(tmp_path / "run", tiny_model_dir, interpolate=[0.5]))
    assert not (tmp_path / "run/eval").exists()


def test_full_sweep_of_another_architecture_is_refused_before_any_model_loads(
    tmp_path, tiny_model_dir, tiny_tokenizer
):
    other = make_tiny_llama(tmp_path / "other", tokenizer=tiny_tokenizer, hidden_size=64)
    models = [EvalModel(name="base", path=str(tiny_model_dir)), EvalModel(name="adapted", path=str(other))]
    with pytest.raises(CptkitError, match="not a fine-tuned copy of the base"):
        plan_sweep([0.5], models, None)


@pytest.mark.parametrize(
    "scales, message",
    [
        ([0.5, 1.5], r"eval.interpolate: 1.5: every scale must be in \[0, 1\]"),
        ([-0.5], r"eval.interpolate: -0.5: every scale must be in \[0, 1\]"),
        ([0.5, 1.0, 0.5], r"eval.interpolate: 0.5 listed more than once"),
    ],
)
def test_bad_interpolate_lists_are_refused_by_the_config(tmp_path, scales, message):
    with pytest.raises(ConfigError, match=message):
        build_config(Config, {"run_dir": str(tmp_path), "eval": {"interpolate": scales}})


def test_every_point_of_the_sweep_is_scored_on_the_downstream_tasks(lora_run, tiny_model_dir, tmp_path):
    from pathlib import Path

    examples = Path(__file__).parents[2] / "examples/tasks"
    task = {"name": "cptkit_capitals_mc", "include": str(examples), "limit": 4}
    cfg = config(lora_run, tiny_model_dir, interpolate=[0.0, 1.0], tasks=[task])
    cfg.eval.output_dir = str(tmp_path / "eval")
    result = eval_cmd.run(cfg)
    scores = result["tasks"]
    assert set(scores) == {"base", "adapted", "interpolated@0", "interpolated@1"}
    acc = {name: scores[name]["cptkit_capitals_mc"]["acc"]["value"] for name in scores}
    assert acc["interpolated@1"] == acc["adapted"] and acc["interpolated@0"] == acc["base"]
    assert {d["model"] for d in result["task_deltas"]} >= {"interpolated@0", "interpolated@1"}

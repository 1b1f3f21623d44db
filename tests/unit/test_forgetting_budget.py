"""The forgetting budget: every held-out evaluation is judged against the base's at step 0, a crossing is
a warning (and a stop when asked), the best checkpoint within the budget survives rotation and is named
in run_meta.json, a resumed run reads the base's numbers back, and a budget that cannot be checked is
refused before any model loads."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path

import pytest
from transformers import TrainerControl

from cptkit.config import Config, build_config
from cptkit.errors import ConfigError, CptkitError
from cptkit.testing.tiny import sample_texts
from cptkit.train.budget import ForgettingBudget
from cptkit.train.callbacks import HeldoutEvalCallback, MetricsWriter
from cptkit.train.checkpoints import mark_complete, rotate


def result(step: int, name: str, role: str, loss: float, docs: int = 20) -> dict:
    """One set's held-out result as the evaluation reports it, `docs` documents of 50 tokens alike."""
    per_document = {"doc_nats": [loss * 50] * docs, "doc_tokens": [50] * docs}
    numbers = {"loss": loss, "perplexity": math.exp(loss), "tokens": 50 * docs}
    return {"type": "eval", "step": step, "set": name, "role": role, **numbers, **per_document}


def evaluation(step: int, general: float, domain: float) -> list[dict]:
    return [result(step, "prose", "general", general), result(step, "sql", "domain", domain)]


# general loss 2.0 at the base; +0.005 nats is +0.5% perplexity, +0.02 is +2%
HISTORY = [(0, 2.0, 3.0), (2, 1.999, 2.8), (4, 2.004, 2.5), (6, 2.02, 2.2), (8, 2.003, 2.3)]


def observed(budget: ForgettingBudget, control: TrainerControl | None = None) -> HeldoutEvalCallback:
    callback = HeldoutEvalCallback([], 0, 1, 2, MetricsWriter("unused", enabled=False), budget)
    for step, general, domain in HISTORY:
        callback.observe(step, evaluation(step, general, domain), control)
        if control is not None and control.should_training_stop:
            break
    return callback


def test_a_crossing_is_a_warning_and_the_best_within_is_by_domain_gain(caplog):
    budget = ForgettingBudget(0.01, max_tokens=1000)
    with caplog.at_level(logging.INFO, logger="cptkit.train.budget"):
        observed(budget)
    crossing = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert crossing == [
        "step 6: general perplexity +2.02% over the base (95% interval [+2.02%, +2.02%]), domain perplexity "
        "gain +55.07%: crosses the forgetting budget of 1.00%"
    ]
    assert (
        "held-out documents that fit in 1000 tokens per set (train.eval_max_tokens)"
        in caplog.records[0].getMessage()
    )
    assert budget.crossed_at == 6 and [c.within for c in budget.checks] == [True, True, False, True]
    # step 6 gained most but crossed; step 8 is back within and gained more than step 4
    assert budget.best().step == 8 and budget.best({2, 4, 6}).step == 4
    assert budget.best().general_change == pytest.approx(math.expm1(0.003))


def test_stop_at_the_budget_stops_at_the_first_crossing(caplog):
    control = TrainerControl()
    budget = ForgettingBudget(0.01, stop=True)
    with caplog.at_level(logging.WARNING, logger="cptkit.train.budget"):
        observed(budget, control)
    assert control.should_training_stop and [c.step for c in budget.checks] == [2, 4, 6]
    assert (
        "stopping at step 6: the forgetting budget is crossed (train.stop_at_forgetting_budget)"
        in caplog.text
    )
    unstopped = TrainerControl()
    observed(ForgettingBudget(0.01), unstopped)
    assert not unstopped.should_training_stop


def test_the_best_checkpoint_within_the_budget_survives_rotation_and_is_named(tmp_path):
    budget = ForgettingBudget(0.01)
    observed(budget)
    for step in (2, 4, 6):  # checkpoint-8 was never saved: the best saved one is checkpoint-4
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"w" * step)
        mark_complete(folder, step)
    assert budget.keep(tmp_path) == tmp_path / "checkpoint-4"
    assert rotate(tmp_path, 1, keep=[budget.keep(tmp_path)]) == [tmp_path / "checkpoint-2"]
    record = budget.record(tmp_path)
    assert record["best_checkpoint"] == str(tmp_path / "checkpoint-4") and record["best_step"] == 4
    assert record["domain_gain"] == pytest.approx(-math.expm1(-0.5))
    assert (record["crossed_at_step"], record["within_budget_at_end"], record["stopped"]) == (6, True, False)


def test_the_budget_text_says_a_crossing_the_run_came_back_from():
    from cptkit.train.budget import budget_text

    budget = ForgettingBudget(0.01)
    observed(budget)  # crosses at step 6, within again at step 8
    assert budget_text(budget.record("no-checkpoints")).startswith(
        "crossed its forgetting budget of 1.00% at step 6, within again at the end: general perplexity "
        "+0.30% at step 8"
    )
    never = ForgettingBudget(0.01)
    observed(never)
    never.checks, never.crossed_at = [c for c in never.checks if c.within], None
    assert budget_text(never.record("no-checkpoints")).startswith(
        "stayed within its forgetting budget of 1.00%: general perplexity +0.30% at step 8"
    )


def test_a_resumed_budget_reads_the_base_back_from_metrics(tmp_path):
    lines = [r for step, g, d in HISTORY[:3] for r in evaluation(step, g, d)]
    lines.insert(2, {"type": "train", "step": 1, "loss": 4.0})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    budget = ForgettingBudget(0.01)
    budget.restore(metrics, through_step=4)
    assert budget.base == evaluation(0, 2.0, 3.0) and [c.step for c in budget.checks] == [2, 4]
    check = budget.observe(6, evaluation(6, 2.02, 2.2))
    assert not check.within and budget.crossed_at == 6
    nothing = ForgettingBudget(0.01)
    nothing.restore(tmp_path / "missing.jsonl", through_step=4)
    assert nothing.base is None and nothing.observe(6, evaluation(6, 2.02, 2.2)) is None


@pytest.mark.parametrize(
    "train, message",
    [
        ({"forgetting_budget": 0}, "train.forgetting_budget: 0.0: must be a fraction above 0"),
        ({"forgetting_budget": 10}, "train.forgetting_budget: 10"),
        (
            {"stop_at_forgetting_budget": True},
            "train.stop_at_forgetting_budget: true needs train.forgetting_budget",
        ),
        (  # saved at an epoch's end, after the evaluation that judges a saving step: no checkpoint judged
            {"forgetting_budget": 0.01, "hf": {"save_strategy": "epoch"}},
            "train.hf.save_strategy: epoch: a forgetting budget judges the checkpoints saved every "
            "save_steps; use save_strategy: steps",
        ),
    ],
)
def test_a_budget_out_of_range_is_a_config_error(train, message):
    with pytest.raises(ConfigError, match=message):
        build_config(Config, {"run_dir": "run", "train": train})


# ---- end to end: a tiny model trained on a domain that pushes its general text out --------------------


def write_domain_only(folder: Path, tokenizer, general: bool = True) -> Path:
    """A prepared dataset that trains on SQL-like text only; prose is a held-out-only general set."""
    from cptkit.config.data import DataConfig, FilterConfig, SourceConfig
    from cptkit.data.prepare import prepare

    rng = random.Random(0)
    sql = [
        " ".join(
            f"SELECT c{rng.randint(0, 9)} FROM t{rng.randint(0, 9)} WHERE k = {rng.randint(0, 99)};"
            for _ in range(30)
        )
        for _ in range(60)
    ]
    inputs = folder.parent / f"{folder.name}-inputs"
    inputs.mkdir(parents=True)
    tokenizer.save_pretrained(str(inputs / "tokenizer"))

    def jsonl(name: str, texts: list[str]) -> str:
        path = inputs / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        return str(path)

    sources = [SourceConfig(name="sql", path=jsonl("sql", sql), role="domain", heldout_fraction=0.2)]
    if general:
        sources.append(
            SourceConfig(name="prose", path=jsonl("prose", sample_texts()[:12]), role="general", weight=0)
        )
    data = DataConfig(
        tokenizer=str(inputs / "tokenizer"),
        sources=sources,
        seq_length=64,
        dedup="none",
        filters=FilterConfig(min_chars=1, min_words=1, max_non_text_fraction=1.0),
        num_proc=1,
        heldout_max_documents=None,
    )
    prepare(data, folder)
    return folder


@pytest.fixture(scope="module")
def domain_only(tmp_path_factory, tiny_tokenizer):
    return write_domain_only(tmp_path_factory.mktemp("budget") / "data", tiny_tokenizer)


def budget_cfg(out: Path, model_dir, dataset, **train) -> Config:
    """Full fine-tuning at a rate that raises the general perplexity past 0.5% by step 3 (-0.01% at
    step 2): saves every 2 steps, held-out evaluation every 3, one checkpoint kept by rotation."""
    cfg = {
        "mode": "full",
        "dataset": str(dataset),
        "output_dir": str(out),
        "report_to": ["none"],
        "eval_steps": 3,
        "eval_max_tokens": 1000,
        "gradient_checkpointing": False,
        "forgetting_budget": 0.005,
        "hf": {
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_steps": 2,
            "save_total_limit": 1,
        },
        **train,
    }
    return build_config(Config, {"model": {"name_or_path": str(model_dir)}, "train": cfg})


def eval_lines(folder: Path) -> list[dict]:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["type"] == "eval"]


def test_training_past_the_budget_keeps_the_best_checkpoint_and_a_resume_keeps_the_base(
    tmp_path, tiny_model_dir, domain_only, caplog
):
    from cptkit.commands.train import run

    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cptkit.train.budget"):
        summary = run(budget_cfg(out, tiny_model_dir, domain_only))
    assert (
        "step 3: general perplexity" in caplog.text
        and "crosses the forgetting budget of 0.50%" in caplog.text
    )
    # evaluated at every eval step and every save step, so each checkpoint is judged
    assert sorted({r["step"] for r in eval_lines(out)}) == [0, 2, 3, 4, 6]
    meta = json.loads((out / "run_meta.json").read_text())
    record = meta["forgetting_budget"]
    assert record == summary["forgetting_budget"] == meta["final"]["forgetting_budget"]
    assert (record["best_step"], record["crossed_at_step"], record["within_budget_at_end"]) == (2, 3, False)
    assert record["best_checkpoint"] == str(out / "checkpoint-2") and record["domain_gain"] > 0.2
    # save_total_limit 1 keeps the newest and the best within the budget
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]

    # interrupted after step 2: the resumed run reads the base's step-0 numbers back, never scores it again
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(out / "checkpoint-2", part / "checkpoint-2")
    for name in ("run_meta.json", "metrics.jsonl"):
        shutil.copy(out / name, part / name)
    resumed = run(budget_cfg(part, tiny_model_dir, domain_only))["forgetting_budget"]
    assert [r["step"] for r in eval_lines(part)].count(0) == 2  # one line per set, from the first run
    assert (resumed["best_step"], resumed["crossed_at_step"]) == (2, 3)
    assert resumed["best_checkpoint"] == str(part / "checkpoint-2")
    assert resumed["last"]["general_change"] == pytest.approx(record["last"]["general_change"], abs=1e-4)


def test_stop_at_the_budget_ends_the_run_complete_at_the_crossing(tmp_path, tiny_model_dir, domain_only):
    from cptkit.commands.train import run

    out = tmp_path / "stop"
    summary = run(budget_cfg(out, tiny_model_dir, domain_only, stop_at_forgetting_budget=True))
    meta = json.loads((out / "run_meta.json").read_text())
    assert summary["steps"] == 3 and meta["status"] == "complete"
    record = meta["forgetting_budget"]
    assert (record["stopped"], record["crossed_at_step"], record["best_step"]) == (True, 3, 2)
    assert (out / "checkpoint-2").is_dir() and (out / "model.safetensors").is_file()


def test_a_crossing_at_the_final_evaluation_is_not_a_stop(tmp_path, tiny_model_dir, domain_only):
    # 3 steps, saved (and so evaluated) only at the last: training ends there whatever the budget says
    from cptkit.commands.train import run

    out = tmp_path / "end"
    cfg = budget_cfg(
        out,
        tiny_model_dir,
        domain_only,
        stop_at_forgetting_budget=True,
        eval_steps=4,
        forgetting_budget=0.001,
    )
    cfg.train.hf.update(max_steps=3, save_steps=4)
    summary = run(cfg)
    record = json.loads((out / "run_meta.json").read_text())["forgetting_budget"]
    assert summary["steps"] == 3 and sorted({r["step"] for r in eval_lines(out)}) == [0, 3]
    assert (record["stopped"], record["crossed_at_step"], record["within_budget_at_end"]) == (False, 3, False)


def test_a_budget_without_a_general_heldout_set_is_refused_before_the_model_loads(
    tmp_path, tiny_model_dir, tiny_tokenizer
):
    from cptkit.commands.train import run

    dataset = write_domain_only(tmp_path / "data", tiny_tokenizer, general=False)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in tiny_model_dir.iterdir():  # a model that cannot load: the refusal must come first
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, no_weights / f.name)
    with pytest.raises(CptkitError, match="add a general source with held-out documents") as refused:
        run(budget_cfg(tmp_path / "out", no_weights, dataset))
    assert "or remove train.forgetting_budget" in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_the_report_says_whether_the_run_stayed_within_its_budget(tmp_path):
    from cptkit.commands import report
    from cptkit.testing.stages import write_metrics

    run = tmp_path / "run"
    write_metrics(run / "train", steps=6)
    report.run(run)
    assert "Forgetting budget" not in (run / "report/report.md").read_text()  # none was set
    budget = ForgettingBudget(0.01, stop=True)
    observed(budget, TrainerControl())
    meta = json.loads((run / "train/run_meta.json").read_text())
    meta["forgetting_budget"] = budget.record(run / "train")
    (run / "train/run_meta.json").write_text(json.dumps(meta))
    report.run(run)
    assert (
        "Forgetting budget: the run crossed its forgetting budget of 1.00% at step 6, and stopped there: general "
        "perplexity +2.02% at step 6, 95% interval [+2.02%, +2.02%]; no saved checkpoint is within it."
    ) in (run / "report/report.md").read_text()

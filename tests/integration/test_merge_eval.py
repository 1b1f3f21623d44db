"""merge -> eval -> report through the CLI after the real prepare and train stages, on CPU: a QLoRA run
(the merge writes both bases, compares them with the adapter on the 4-bit base and keeps the closer),
then eval of base / adapter / merged model and the report of the whole run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cptkit.cli import main as cli
from cptkit.testing.tiny import make_tiny_llama, sample_texts


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("qlora-run")
    # bitsandbytes' CPU 4-bit kernels need at least one quantisation block (64) of input features
    model_dir = make_tiny_llama(root / "base", tokenizer=tiny_tokenizer, hidden_size=64, num_heads=4)
    texts = sample_texts()
    for name, part in (("domain", texts[:20]), ("general", texts[50:60])):
        (root / name).mkdir()
        for i, text in enumerate(part):
            (root / name / f"{i:03}.txt").write_text(text[:1200], encoding="utf-8")
    config = {
        "run_dir": str(root / "run"),
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "tokenizer": str(model_dir),
            "seq_length": 128,
            "heldout_fraction": 0.2,
            "num_proc": 1,
            "sources": [
                {"name": "docs", "path": str(root / "domain"), "role": "domain", "weight": 0.7},
                {"name": "prose", "path": str(root / "general"), "role": "general", "weight": 0.3},
            ],
        },
        "train": {
            "mode": "qlora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "gradient_checkpointing": False,
            "report_to": ["none"],
            "eval_steps": 2,
            "eval_max_tokens": 300,
            "hf": {
                "max_steps": 4,
                "per_device_train_batch_size": 4,
                "learning_rate": 3e-3,
                "logging_steps": 1,
            },
        },
        "merge": {"dtype": "float32", "compare_tokens": 512},
        "eval": {"batch_size": 4, "max_documents": 3},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    for command in (["prepare", str(path)], ["train", str(path)], ["merge", str(path)], ["eval", str(path)]):
        assert cli(command) == 0, command
    assert cli(["report", str(root / "run")]) == 0
    return path, root / "run"


def test_qlora_merge_compares_both_bases_and_loads_without_peft(run):
    from transformers import AutoModelForCausalLM

    _, run_dir = run
    report = json.loads((run_dir / "merged/merge_report.json").read_text())
    assert report["mode"] == "qlora" and set(report["comparison"]["candidates"]) == {"bf16", "dequantized"}
    assert report["kept"] in {"bf16", "dequantized"} and report["comparison"]["reference"]["tokens"] > 0
    assert not (run_dir / "merged/adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(str(run_dir / "merged"))


def test_eval_compares_base_adapter_and_merged_and_report_shows_it(run):
    _, run_dir = run
    results = json.loads((run_dir / "eval/results.json").read_text())
    rows = {(r["model"], r["set"]): r for r in results["results"]}
    assert {m for m, _ in rows} == {"base", "adapted", "merged"} and {s for _, s in rows} == {"docs", "prose"}
    assert {d["role"] for d in results["deltas"]} == {"domain", "general"}
    if json.loads((run_dir / "merged/merge_report.json").read_text())["kept"] == "dequantized":
        for s in ("docs", "prose"):  # the adapter is evaluated on the NF4 base it trained on, as merged
            assert rows[("merged", s)]["loss"] == pytest.approx(rows[("adapted", s)]["loss"], rel=1e-3)
    report = json.loads((run_dir / "report/report.json").read_text())
    assert report["missing"] == [] and report["merge"]["mode"] == "qlora"
    assert set(report["plots"]) == {"training", "heldout", "throughput", "perplexity"}
    assert "## In one line per set" in (run_dir / "report/report.md").read_text()


def test_bad_adapter_path_through_the_cli(run, tmp_path, capsys):
    path, _ = run
    assert (
        cli(
            [
                "merge",
                str(path),
                f"merge.adapter={tmp_path / 'nothing'}",
                f"merge.output_dir={tmp_path / 'm'}",
            ]
        )
        == 2
    )
    assert "no such adapter folder" in capsys.readouterr().err
    assert not Path(tmp_path / "m").exists()


def test_qlora_merge_at_a_scale_is_compared_with_the_adapter_at_that_scale(run, tmp_path):
    """merge.scale 0.5 merges half the update into both bases; the reference they are compared with is the
    adapter on the 4-bit base at the same scale, so the dequantised merge (that very model, merged) stays
    as close to it as at scale 1, while it differs from the merge at scale 1."""
    from transformers import AutoModelForCausalLM

    path, run_dir = run
    out = tmp_path / "half"
    assert cli(["merge", str(path), "merge.scale=0.5", f"merge.output_dir={out}"]) == 0
    half = json.loads((out / "merge_report.json").read_text())
    whole = json.loads((run_dir / "merged/merge_report.json").read_text())
    assert half["scale"] == 0.5 and whole["scale"] == 1.0
    assert "times merge.scale 0.5" in half["comparison"]["reference"]["what"]
    # the dequantised merge is the reference merged: as close at 0.5 as at 1 (fp32 rounding); the merges
    # at 0.5 and 1 differ by more than 1e-4 (below), which a reference left at scale 1 would show here
    for report in (half, whole):
        assert report["comparison"]["candidates"]["dequantized"]["max_abs_logit_diff"] < 1e-5
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (
            AutoModelForCausalLM.from_pretrained(str(f))(input_ids=ids).logits
            for f in (out, run_dir / "merged")
        )
    assert (a - b).abs().max() > 1e-4


def test_merge_scale_outside_0_1_is_refused_through_the_cli(run, tmp_path, capsys):
    path, _ = run
    assert cli(["merge", str(path), "merge.scale=1.5", f"merge.output_dir={tmp_path / 'm'}"]) == 2
    assert "merge.scale" in capsys.readouterr().err and not (tmp_path / "m").exists()

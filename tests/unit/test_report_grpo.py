"""The report's GRPO and export parts, from files written as docs/CONTRACTS.md (grpo -> GRPO, export ->
EXPORT) says the stages write them: every number reaches report.json and report.md; an absent file is a
`missing` line naming the command; a run without those stages reports as before."""

from __future__ import annotations

import json

import pytest

from cptkit.commands import report
from cptkit.config import Config
from cptkit.paths import Paths
from cptkit.pipeline.stages import _report_inputs
from cptkit.testing.stages import write_metrics

REWARDS = [
    {"name": "numeric", "type": "numeric", "weight": 1.0},
    {"name": "length", "type": "length", "weight": 0.2},
]


def _grpo_metrics(steps: int = 10) -> list[dict]:
    """metrics.jsonl lines with TRL's GRPO names; `kl` and the length reward are not logged at step 1."""
    rows = []
    for step in range(1, steps + 1):
        row = {
            "step": step,
            "loss": 0.01 * step,
            "learning_rate": 1e-5,
            "reward": 0.1 * step,
            "reward_std": 0.3,
            "rewards/numeric/mean": 0.08 * step,
            "rewards/numeric/std": 0.2,
            "completions/mean_length": 40.0 - step,
            "completions/clipped_ratio": 0.0,
        }
        if step > 1:
            row["kl"] = 0.001 * step
            row["rewards/length/mean"] = 0.5 + 0.01 * step
        rows.append(row)
    return rows


SCORES = {
    "rewards": REWARDS,
    "sampling": {"greedy": True, "max_new_tokens": 16},
    "prompts": 32,
    "before": {
        "model": "run/sft",
        "reward": 0.25,
        "rewards": {"numeric": 0.125, "length": 0.6},
        "completion_chars": 51.5,
    },
    "after": {
        "model": "run/grpo",
        "reward": 0.95,
        "rewards": {"numeric": 0.75, "length": 1.0},
        "completion_chars": 3.25,
    },
    "samples": [
        {
            "prompt": "What is 2 + 3?\nAnswer with the number only.",
            "answer": "5",
            "before": "The sum of 2 and 3 is five, `5`.",
            "after": "5",
            "reward_before": 0.1,
            "reward_after": 1.2,
        }
    ],
}
PROMPTS = {
    "prompts": "arith.jsonl",
    "template": "chat",
    "records": 300,
    "skipped": {"too_long": 2},
    "train_prompts": 266,
    "heldout_prompts": 32,
    "heldout_source": "fraction",
}
EXPORT = {
    "source": "run/grpo",
    "architecture": "llama",
    "type": "q8_0",
    "path": "run/export/model.q8_0.gguf",
    "bytes": 145 * 2**20,
    "seconds": 3.5,
    "tensors": 272,
    "vocab_size": 49152,
    "tokenizer": {
        "model": "gpt2",
        "pre": "smollm",
        "tokens": 49152,
        "merges": 48900,
        "special": {"bos": 1, "eos": 2, "pad": 2, "unk": None},
        "chat_template": True,
    },
    "verify": {
        "tokens": 2048,
        "max_abs_logit_diff": 0.3125,
        "mean_abs_logit_diff": 0.0412,
        "top1_agreement": 0.9951,
        "tolerance": 1.0,
        "passed": True,
    },
    "llama_cpp": None,
}


def _run_with_grpo(tmp_path, scores: bool = True):
    run = tmp_path / "run"
    write_metrics(run / "train", steps=6)
    grpo = run / "grpo"
    grpo.mkdir(parents=True)
    (grpo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _grpo_metrics()))
    meta = {
        "status": "complete",
        "mode": "lora",
        "base_model": "m",
        "stage": "grpo",
        "final": True,
        "seconds": 42.5,
    }
    (grpo / "run_meta.json").write_text(json.dumps(meta))
    (grpo / "grpo_prompts.json").write_text(json.dumps(PROMPTS))
    if scores:
        (grpo / "grpo_scores.json").write_text(json.dumps(SCORES))
    return run


def test_grpo_block_and_section_hold_the_training_and_heldout_numbers(tmp_path):
    run = _run_with_grpo(tmp_path)
    out = report.run(run)
    saved = json.loads((run / "report/report.json").read_text())
    g = saved["grpo"]
    assert not any(m.startswith("grpo") for m in saved["missing"])
    t = g["train"]
    assert t["final_step"] == 10 and t["seconds"] == 42.5 and t["mode"] == "lora"
    assert t["reward"] == {"first": pytest.approx(0.1), "last": pytest.approx(1.0)}
    assert t["rewards"]["numeric"] == {"first": pytest.approx(0.08), "last": pytest.approx(0.8)}
    # first *logged*: the length reward starts at step 2
    assert t["rewards"]["length"] == {"first": pytest.approx(0.52), "last": pytest.approx(0.6)}
    assert t["kl_last"] == pytest.approx(0.01)
    assert t["completion_length"] == {"first": 39.0, "last": 30.0}
    assert g["heldout"]["before"] == SCORES["before"] and g["heldout"]["after"] == SCORES["after"]
    assert g["prompts"]["train_prompts"] == 266
    assert out["plots"]["grpo"] == "grpo.png" and (run / "report/grpo.png").stat().st_size > 0

    md = (run / "report/report.md").read_text()
    assert "- **grpo** on 32 held-out prompts: reward 0.250 -> 0.950 (+0.700)" in md
    assert "## GRPO" in md and "10 steps in 42 s" in md and "reward 0.100 -> 1.000" in md
    assert "| numeric (numeric) | 1 | 0.125 | 0.750 | +0.625 | 0.080 -> 0.800 |" in md
    assert "| length (length) | 0.2 | 0.600 | 1.000 | +0.400 | 0.520 -> 0.600 |" in md
    assert "| **total** | - | 0.250 | 0.950 | +0.700 | 0.100 -> 1.000 |" in md
    assert "skipped: too_long 2" in md and "![grpo](grpo.png)" in md
    assert "after (1.20): `5`" in md and "'5'" in md  # backticks in a completion cannot break the markdown
    assert md.index("## Training") < md.index("## GRPO")


def test_missing_grpo_scores_is_named_with_the_command(tmp_path):
    run = _run_with_grpo(tmp_path, scores=False)
    out = report.run(run)
    assert any("grpo_scores.json" in m and "cptkit grpo" in m for m in out["missing"])
    assert "heldout" not in out["grpo"] and "train" in out["grpo"]
    md = (run / "report/report.md").read_text()
    assert "## GRPO" in md and "**grpo**" not in md


def test_export_block_and_table(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "train", steps=6)
    (run / "export").mkdir(parents=True)
    (run / "export/export_report.json").write_text(json.dumps(EXPORT))
    out = report.run(run)
    e = out["export"]
    assert e["verify"] == EXPORT["verify"] and e["llama_cpp"] is None and e["bytes"] == EXPORT["bytes"]
    assert e["tokenizer"]["chat_template"] is True
    md = (run / "report/report.md").read_text()
    assert "## Export" in md and "llama as GGUF q8_0, 145.0 MiB, 272 tensors" in md
    assert "| transformers GGUF loader | passed | 2,048 | 0.3125 | 0.0412 | 99.51% | 1 |" in md
    assert "| llama.cpp | not run |" in md


def test_export_folder_without_report_is_missing(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "train", steps=6)
    (run / "export").mkdir(parents=True)
    out = report.run(run)
    assert "export" not in out
    assert any("export_report.json" in m and "cptkit export" in m for m in out["missing"])


def test_run_without_grpo_or_export_has_no_blocks_and_no_missing_lines(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "train", steps=6)
    out = report.run(run)
    assert "grpo" not in out and "export" not in out
    assert not any(m.startswith(("grpo", "export")) for m in out["missing"])
    md = (run / "report/report.md").read_text()
    assert "## GRPO" not in md and "## Export" not in md


def test_report_stage_reads_the_grpo_and_export_outputs(tmp_path):
    cfg = Config(run_dir=str(tmp_path / "run"))
    paths = Paths.under(tmp_path / "run")
    inputs = set(_report_inputs(cfg))
    assert {paths.grpo_meta, paths.grpo_scores, paths.export_report} <= inputs

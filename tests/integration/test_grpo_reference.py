"""`cptkit grpo` in full mode against its KL reference: with beta > 0 TRL loads the reference model from the
policy's start folder (the start model's weights, unchanged while the policy trains) and `kl` is logged,
0 before the first update and above 0 after; with beta 0 no reference is built and the report says "-"."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cptkit.cli import main as cli
from cptkit.testing.grpo import grpo_config


@pytest.fixture
def captured_trainer(monkeypatch):
    """The GRPOTrainer `cptkit grpo` builds, kept for the test to look at after the run."""
    from cptkit.grpo import trainer as trainer_module

    kept: dict = {}
    build = trainer_module.build_grpo_trainer

    def keeping(*args, **kwargs):
        trainer, callbacks = build(*args, **kwargs)
        kept["trainer"] = trainer
        return trainer, callbacks

    monkeypatch.setattr(trainer_module, "build_grpo_trainer", keeping)
    return kept


def with_beta(config, beta: float, steps: int):
    cfg = yaml.safe_load(config.read_text())
    cfg["grpo"]["beta"] = beta
    cfg["grpo"]["hf"]["max_steps"] = steps
    config.write_text(yaml.safe_dump(cfg))
    return config


def train_rows(out) -> list[dict]:
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in logged if r.get("type") == "train"]


def test_full_mode_with_beta_keeps_the_start_model_as_reference(tmp_path, tiny_model_dir, captured_trainer):
    from transformers import AutoModelForCausalLM

    config = with_beta(grpo_config(tmp_path, tiny_model_dir, mode="full", steps=4), beta=0.1, steps=4)
    assert cli(["grpo", str(config)]) == 0
    out = tmp_path / "run" / "grpo"
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # step 1 is scored before any update: the policy is the reference
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6), rows[0]
    assert all(r["kl"] > 1e-4 for r in rows[1:]), [r["kl"] for r in rows]

    trainer = captured_trainer["trainer"]
    reference = trainer.ref_model
    assert reference is not None and reference is not trainer.model
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    ref_weights = reference.state_dict()
    assert set(ref_weights) == set(start)
    for name, weight in start.items():
        assert torch.equal(ref_weights[name].cpu(), weight), name
    policy = trainer.model.state_dict()
    assert any(not torch.equal(policy[name].cpu(), start[name]) for name in start), "the policy never moved"

    summary = json.loads((out / "run_meta.json").read_text())
    assert summary["status"] == "complete" and summary["mode"] == "full"


def test_beta_zero_builds_no_reference_and_the_report_says_so(tmp_path, tiny_model_dir, captured_trainer):
    config = with_beta(grpo_config(tmp_path, tiny_model_dir, mode="full", steps=2), beta=0.0, steps=2)
    assert cli(["grpo", str(config)]) == 0
    assert captured_trainer["trainer"].ref_model is None
    out = tmp_path / "run" / "grpo"
    assert all("kl" not in r for r in train_rows(out))

    assert cli(["report", str(config)]) == 0
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert report["grpo"]["train"]["kl_last"] is None
    page = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "## GRPO" in page and ", KL -, completion length" in page

"""`cptkit grpo` end to end on CPU with a tiny random Llama: on a toy task it can learn (write vowels), the
training reward rises and the held-out reward after GRPO is above the one before; the files of the
contract; a LoRA run whose adapter loads back; the stage in `cptkit run` skipped without a grpo section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cptkit.cli import main as cli
from cptkit.testing.grpo import grpo_config


def test_grpo_reward_rises_on_a_learnable_task(tmp_path, tiny_model_dir):
    config = grpo_config(tmp_path, tiny_model_dir)
    assert cli(["grpo", str(config)]) == 0
    out = tmp_path / "run" / "grpo"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r.get("type") == "train"]
    assert [r["step"] for r in train] == list(range(1, 41))
    for key in ("loss", "learning_rate", "reward", "rewards/vowels/mean", "completions/mean_length"):
        assert key in train[0], key
    first = sum(r["reward"] for r in train[:5]) / 5
    last = sum(r["reward"] for r in train[-5:]) / 5
    assert last > first + 0.15, (first, last)

    scores = json.loads((out / "grpo_scores.json").read_text())
    assert scores["prompts"] == 16 and scores["sampling"] == {"greedy": True, "max_new_tokens": 8}
    assert scores["rewards"] == [{"name": "vowels", "type": "function", "weight": 1.0}]
    assert scores["after"]["reward"] > scores["before"]["reward"] + 0.1, scores
    assert scores["before"]["model"] == str(tiny_model_dir)
    assert len(scores["samples"]) == 8 and set(scores["samples"][0]) >= {"prompt", "before", "after"}

    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["status"] == "complete" and meta["stage"] == "grpo" and meta["mode"] == "full"
    assert meta["base_model"] == str(tiny_model_dir) and meta["seconds"] > 0
    stats = json.loads((out / "grpo_prompts.json").read_text())
    assert stats["train_prompts"] == 48 and stats["heldout_prompts"] == 16
    assert stats["heldout_source"] == str(tmp_path / "heldout.jsonl")


def write_sft_adapter(folder: Path, model_dir: Path) -> Path:
    """A LoRA adapter as `cptkit sft` leaves one (random, non-zero, so merging it changes the model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


def test_grpo_lora_on_an_sft_adapter_loads_back(tmp_path, tiny_model_dir):
    """A LoRA SFT output is merged into its base once (grpo/start); the GRPO adapter saved on top of it
    loads back onto that folder and writes exactly the held-out completions scored after training."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cptkit.generate import Sampling, generate_with_model

    sft = write_sft_adapter(tmp_path / "sft", tiny_model_dir)
    config = grpo_config(tmp_path, tiny_model_dir, mode="lora", steps=6, lr=5e-3)
    cfg = yaml.safe_load(config.read_text())
    cfg["grpo"]["model"] = str(sft)
    config.write_text(yaml.safe_dump(cfg))
    assert cli(["grpo", str(config)]) == 0
    out = tmp_path / "run" / "grpo"
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["base_model"] == str(out / "start") and meta["merged_adapter"] == str(sft)
    assert (out / "adapter_config.json").is_file() and (out / "start" / "config.json").is_file()
    scores = json.loads((out / "grpo_scores.json").read_text())
    assert scores["before"]["model"] == str(sft)

    tokenizer = AutoTokenizer.from_pretrained(out)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "start"), out).eval()
    prompts = [s["prompt"] for s in scores["samples"]]
    again = generate_with_model(policy, tokenizer, prompts, Sampling(8), batch_size=8)
    assert [g.text for g in again] == [s["after"] for s in scores["samples"]]

    # the same config again: the run is complete and its start folder reused, nothing trains twice
    assert cli(["grpo", str(config)]) == 0
    assert json.loads((out / "run_meta.json").read_text())["final"]["steps"] == 6


def test_grpo_stage_runs_in_cptkit_run_then_is_skipped(tmp_path, tiny_model_dir):
    from cptkit.commands import run as run_command
    from cptkit.config import Config, load_config

    config = grpo_config(tmp_path, tiny_model_dir, steps=2)
    cfg = load_config(Config, config)
    first = run_command.run(cfg)
    assert {r["stage"]: r["status"] for r in first["stages"]} == {"grpo": "done", "report": "done"}
    assert (tmp_path / "run" / "grpo" / "grpo_scores.json").is_file()
    assert "## GRPO" in (tmp_path / "run" / "report" / "report.md").read_text()
    again = run_command.run(load_config(Config, config))
    assert {r["stage"]: r["status"] for r in again["stages"]} == {"grpo": "skipped", "report": "skipped"}


def test_grpo_stage_is_left_out_without_a_grpo_section(tmp_path, tiny_model_dir):
    from cptkit.config import Config, load_config
    from cptkit.errors import CptkitError
    from cptkit.pipeline.runner import plan

    config = grpo_config(tmp_path, tiny_model_dir)
    cfg = yaml.safe_load(config.read_text())
    cfg["eval"] = {"models": [{"name": "base", "path": str(tiny_model_dir)}]}
    del cfg["grpo"]
    config.write_text(yaml.safe_dump(cfg))
    loaded = load_config(Config, config)
    assert "grpo" not in [stage.name for stage, _ in plan(loaded, None, None)]
    with pytest.raises(CptkitError, match="no grpo section"):
        plan(loaded, None, "grpo")


def test_grpo_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir):
    """Extended from 2 to 4 steps, the run continues at its checkpoint: each step logged once, the
    held-out `before` kept from the start model, not the resumed policy."""
    config = grpo_config(tmp_path, tiny_model_dir, steps=2)
    cfg = yaml.safe_load(config.read_text())
    cfg["grpo"]["hf"]["save_steps"] = 2
    config.write_text(yaml.safe_dump(cfg))
    assert cli(["grpo", str(config)]) == 0
    out = tmp_path / "run" / "grpo"
    before = json.loads((out / "grpo_scores.json").read_text())["before"]
    assert cli(["grpo", str(config), "grpo.hf.max_steps=4"]) == 0
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["resumed_from"] == str(out / "checkpoint-2") and meta["final"]["steps"] == 4
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r.get("type") == "train"] == [1, 2, 3, 4]
    assert json.loads((out / "grpo_scores.json").read_text())["before"] == before

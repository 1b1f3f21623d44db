"""`cptkit grpo` end to end on CPU with a tiny random Llama: on a toy task it can learn (write vowels), the
training reward rises and the held-out reward after GRPO is above the one before; the files of the
contract; a LoRA run whose adapter loads back; the stage in `cptkit run` skipped without a grpo section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cptkit.cli import main as cli

VOWELS_REWARD = '''
def vowel_share(prompts, completions, completion_ids=None, **columns):
    """The share of a completion's characters that are vowels: a random model writes few."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]
'''


def write_task(root: Path) -> tuple[Path, Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    reward = root / "vowels.py"
    reward.write_text(VOWELS_REWARD)
    prompts, heldout = root / "prompts.jsonl", root / "heldout.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something {i}."}) + "\n" for i in range(48)))
    heldout.write_text("".join(json.dumps({"prompt": f"Write a word {i}."}) + "\n" for i in range(16)))
    return reward, prompts, heldout


def grpo_config(root: Path, model_dir: Path, mode: str = "full", steps: int = 40, lr: float = 1e-2) -> Path:
    reward, prompts, heldout = write_task(root)
    cfg = {
        "run_dir": str(root / "run"),
        "model": {"name_or_path": str(model_dir)},
        "grpo": {
            "mode": mode,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "prompts": str(prompts),
            "heldout_prompts": str(heldout),
            "rewards": [{"type": "function", "function": f"{reward}:vowel_share", "name": "vowels"}],
            "num_generations": 8,
            "max_completion_length": 8,
            "beta": 0.0,
            "schedule": {"type": "constant", "warmup": 0},
            "report_to": ["none"],
            "hf": {"max_steps": steps, "learning_rate": lr, "save_steps": 1000},
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


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

"""A toy GRPO task a tiny random Llama can learn on CPU in seconds (write vowels), and its config:
shared by the integration and GPU tests of `cptkit grpo`."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

VOWELS_REWARD = '''
def vowel_share(prompts, completions, completion_ids=None, **columns):
    """The share of a completion's characters that are vowels: a random model writes few."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]
'''


def write_task(root: Path) -> tuple[Path, Path, Path]:
    """The reward module, 48 training prompts and 16 held-out prompts under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    reward = root / "vowels.py"
    reward.write_text(VOWELS_REWARD)
    prompts, heldout = root / "prompts.jsonl", root / "heldout.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something {i}."}) + "\n" for i in range(48)))
    heldout.write_text("".join(json.dumps({"prompt": f"Write a word {i}."}) + "\n" for i in range(16)))
    return reward, prompts, heldout


def grpo_section(
    root: Path,
    mode: str = "full",
    steps: int = 40,
    lr: float = 1e-2,
    group: int = 8,
    lora: dict | None = None,
    **settings,
) -> dict:
    """The `grpo:` section of a run on the toy task written under `root` (8 new tokens, no KL, constant
    lr); `settings` are further grpo keys (heldout_max, model, ...)."""
    reward, prompts, heldout = write_task(root)
    return {
        "mode": mode,
        "lora": lora or {"r": 8, "alpha": 16, "dropout": 0.0},
        "prompts": str(prompts),
        "heldout_prompts": str(heldout),
        "rewards": [{"type": "function", "function": f"{reward}:vowel_share", "name": "vowels"}],
        "num_generations": group,
        "max_completion_length": 8,
        "beta": 0.0,
        "schedule": {"type": "constant", "warmup": 0},
        "report_to": ["none"],
        "hf": {"max_steps": steps, "learning_rate": lr, "save_steps": 1000},
        **settings,
    }


def grpo_config(root: Path, model_dir: Path, mode: str = "full", steps: int = 40, lr: float = 1e-2) -> Path:
    """A config of `cptkit grpo` alone on the toy task (group of 8)."""
    cfg = {
        "run_dir": str(root / "run"),
        "model": {"name_or_path": str(model_dir)},
        "grpo": grpo_section(root, mode=mode, steps=steps, lr=lr),
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path

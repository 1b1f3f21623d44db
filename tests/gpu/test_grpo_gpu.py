"""On a CUDA GPU: `cptkit grpo` in lora and qlora mode trains a few steps on a tiny Llama and writes its
files, and with vLLM installed generation goes through it (TRL's colocate mode). Run through the device
tool: pytest -m gpu tests/gpu."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

from cptkit.cli import main as cli
from cptkit.testing.grpo import grpo_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def run_grpo(tmp_path, model_dir, mode: str, generation: str = "transformers", steps: int = 3):
    config = grpo_config(tmp_path, model_dir, mode=mode, steps=steps, lr=5e-3)
    cfg = yaml.safe_load(config.read_text())
    cfg["grpo"]["generation"] = generation
    config.write_text(yaml.safe_dump(cfg))
    assert cli(["grpo", str(config)]) == 0
    out = tmp_path / "run" / "grpo"
    meta = json.loads((out / "run_meta.json").read_text())
    scores = json.loads((out / "grpo_scores.json").read_text())
    return out, meta, scores


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_grpo_trains_on_the_gpu(tmp_path, tiny_model_dir, mode):
    if mode == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("qlora needs bitsandbytes")
    out, meta, scores = run_grpo(tmp_path, tiny_model_dir, mode)
    assert meta["status"] == "complete" and meta["mode"] == mode and meta["final"]["steps"] == 3
    assert (out / "adapter_config.json").is_file()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r.get("type") == "train"] == [1, 2, 3]
    assert all("peak_memory_gb" in r and "rewards/vowels/mean" in r for r in logged)
    assert scores["before"]["reward"] is not None and scores["after"]["reward"] is not None


def test_grpo_generates_through_vllm_where_installed(tmp_path, tiny_model_dir):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    out, meta, scores = run_grpo(tmp_path, tiny_model_dir, "lora", generation="vllm", steps=2)
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.use_vllm and args.vllm_mode == "colocate"
    assert meta["final"]["steps"] == 2

"""bench/export.py's pure parts: the random Llama it writes shard by shard (a folder transformers loads,
of the shapes the config says), the 8B's size, the export configs, and the table from files written as
the EXPORT contract says."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_export", ROOT / "bench" / "export.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_export"] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_llama3_8b_shape_is_8b():
    assert bench.parameter_count(bench.LLAMA3_8B) == 8_030_261_248  # Meta-Llama-3-8B's parameter count
    plan = bench.shard_plan(bench.LLAMA3_8B)
    assert len(plan) == 34 and plan[-1][0] == "model-00034-of-00034.safetensors"


def test_random_llama_loads_with_transformers_and_matches_the_plan(tmp_path, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    config = {
        **bench.LLAMA3_8B,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": len(tiny_tokenizer),
    }
    size = bench.write_random_llama(config, tmp_path / "m", seed=3)
    assert size == 2 * bench.parameter_count(config)
    index = json.loads((tmp_path / "m/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    state = model.state_dict()
    for _, tensors in bench.shard_plan(config):
        for name, shape in tensors.items():
            assert tuple(state[name].shape) == shape, name
    q = state["model.layers.1.self_attn.q_proj.weight"].float()
    assert q.std().item() == pytest.approx(bench.INIT_STD, rel=0.1)
    assert torch.equal(state["model.norm.weight"].float(), torch.ones(64))
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, len(tiny_tokenizer)) and torch.isfinite(out).all()


def test_reserved_tokens_fill_the_vocabulary():
    names = bench.reserved_tokens(49152, 128256)
    assert len(names) == 128256 - 49152 and names[0] == "<|reserved_special_token_0|>"
    assert bench.reserved_tokens(100, 50) == []


def test_export_config_is_valid(tmp_path):
    from cptkit.config import Config, build_config

    (tmp_path / "model").mkdir()
    cfg = build_config(Config, bench.export_config(str(tmp_path / "model"), tmp_path / "out", "q8_0", False))
    assert cfg.export.type == "q8_0" and cfg.export.verify is False
    assert cfg.export.output_dir == str(tmp_path / "out")


REPORT = {
    "source": "/models/smollm2",
    "architecture": "llama",
    "type": "q8_0",
    "path": "/tmp/x/smollm2.q8_0.gguf",
    "bytes": 3 * 2**29,
    "seconds": 4.25,
    "tensors": 272,
    "vocab_size": 49152,
    "tokenizer": {
        "model": "gpt2",
        "pre": "smollm",
        "tokens": 49152,
        "merges": 48900,
        "special": {},
        "chat_template": True,
    },
    "verify": {
        "tokens": 2048,
        "max_abs_logit_diff": 0.5,
        "mean_abs_logit_diff": 0.03125,
        "top1_agreement": 0.99,
        "tolerance": 1.0,
        "passed": True,
    },
    "llama_cpp": {"top1_agreement": 0.98, "max_abs_logit_diff": 0.75},
}


def test_table_from_fabricated_reports():
    checked = bench.row("smollm2-135m", REPORT, 9.5)
    unchecked = bench.row(
        "llama3-8b-random", {**REPORT, "verify": None, "llama_cpp": None, "type": "f16"}, 120.0
    )
    assert checked["max_abs_logit_diff"] == 0.5 and checked["llama_cpp_top1_agreement"] == 0.98
    assert unchecked["verified"] is False and unchecked["top1_agreement"] is None
    failed = {"model": "llama3-8b-random", "type": "bf16", "error": "exit 1", "command_seconds": 3.0}
    lines = bench.table_lines([checked, unchecked, failed])
    assert lines[2] == "| smollm2-135m | q8_0 | 1.50 | 4.2 | 9.5 | 0.5 | 0.03125 | 99.00% | yes | 98.00% |"
    assert "| llama3-8b-random | f16 | 1.50 | 4.2 | 120.0 | - | - | - | not checked | - |" == lines[3]
    assert "failed: exit 1" in lines[4]

"""On a CUDA GPU: `cptkit plan` plans for the GPU present too, with the memory torch reports and the
peak cptkit.model.flops knows for its name. Run through the device tool: pytest -m gpu tests/gpu."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cptkit import cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_plan_lists_the_gpu_present_beside_the_named_one(tmp_path, tiny_model_dir):
    from cptkit.testing.tiny import sample_texts

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(sample_texts(40)):
        (corpus / f"{i}.txt").write_text(text, encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "model": {"name_or_path": str(tiny_model_dir)},
                "data": {"tokenizer": str(tiny_model_dir), "sources": [{"name": "d", "path": str(corpus)}]},
                "train": {"mode": "lora"},
            }
        )
    )
    out = tmp_path / "plan.json"
    assert cli.main(["plan", str(config), "--gpu", "rtx4090", "--json", str(out)]) == 0
    gpus = json.loads(out.read_text())["gpus"]
    assert [g["gpu"]["name"] for g in gpus] == ["rtx4090", "present"]
    present = gpus[1]
    assert present["gpu"]["memory_bytes"] == torch.cuda.get_device_properties(0).total_memory
    assert present["gpu"]["peak_bf16_tflops"] > 0 and present["speed"]["tokens_per_second"] > 0

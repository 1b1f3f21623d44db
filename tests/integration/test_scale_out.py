"""The shipped accelerate presets on two CPU processes (gloo, fp32): `accelerate launch -m cptkit
train` with the same config file trains and saves under DDP and FSDP2, and two DDP ranks of 2 rows
each train the same adapter as one process with 4 rows (plain SGD, so the comparison measures the
training and not Adam's amplification of rounding noise in near-zero gradients)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cptkit.presets.accelerate import path as preset

sys.path.insert(0, str(Path(__file__).parent))
from test_train import losses, write_dataset  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, model_dir: Path, dataset: Path, out: Path, batch: int) -> Path:
    cfg = {
        "seed": 7,
        "model": {"name_or_path": str(model_dir)},
        "train": {
            "mode": "lora",
            "dataset": str(dataset),
            "output_dir": str(out),
            "report_to": ["none"],
            "eval_steps": 1000,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "gradient_checkpointing": False,
            "hf": {
                "max_steps": 4,
                "per_device_train_batch_size": batch,
                "optim": "sgd",
                "learning_rate": 0.5,
                "logging_steps": 1,
                "save_steps": 2,
                "dataloader_drop_last": True,
            },
        },
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(tmp_path: Path, engine: str | None, config: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    if engine is None:
        command = [sys.executable, "-m", "cptkit", "train", str(config)]
    else:
        on_cpu = tmp_path / f"{engine}-cpu.yaml"
        text = preset(engine).read_text().replace("use_cpu: false", "use_cpu: true")
        on_cpu.write_text(text.replace("mixed_precision: bf16", "mixed_precision: 'no'"))  # fp32 on CPU
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(on_cpu),
            "--num_processes",
            "2",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "cptkit",
            "train",
            str(config),
        ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_tokenizer):
    return write_dataset(tmp_path_factory.mktemp("prepared"), tiny_tokenizer)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, dataset):
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "single"
    _launch(tmp, None, _config(tmp, tiny_model_dir, dataset, out, batch=4))
    return out


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_train_and_save_like_one(tmp_path, tiny_model_dir, dataset, single, engine):
    out = tmp_path / engine
    _launch(tmp_path, engine, _config(tmp_path, tiny_model_dir, dataset, out, batch=2))
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["status"] == "complete" and meta["world_size"] == 2
    assert set(losses(out)) == {1, 2, 3, 4}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for line in (x for x in lines if x["type"] == "train"):  # the loss terms' metrics are all ranks' too
        assert line["loss/causal_lm"] == pytest.approx(line["loss"], rel=1e-4)
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    one, two = _adapter(single), _adapter(out)
    assert one.keys() == two.keys()  # the whole adapter, gathered from the shards under FSDP2
    for name, tensor in one.items():
        assert two[name].shape == tensor.shape and torch.isfinite(two[name]).all()
    moved = [n for n in two if "lora_B" in n and two[n].abs().max() > 0]
    assert moved, "lora_B starts at zero; training must have moved it"
    if engine == "ddp":  # 2 ranks x 2 rows are the 4 rows one process takes: the same training
        for name, tensor in one.items():
            torch.testing.assert_close(two[name], tensor, atol=1e-5, rtol=1e-4)

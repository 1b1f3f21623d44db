"""Loads cptkit refuses because they could run code (a model or tokenizer with its own code, pickled
objects in weights, adapters or checkpoints) end in one CptkitError that says what and what to do, in
train, eval, merge and on resume; never a traceback from transformers or torch."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml

from cptkit.config.model import ModelConfig
from cptkit.config.train import TrainConfig
from cptkit.errors import CptkitError, Refused


@dataclass
class Payload:
    """A custom class: torch.load(weights_only=True) must refuse to rebuild it."""

    command: str = "echo hello"


def _custom_code_model(tiny_model_dir, folder, tokenizer_too: bool = True):
    """A copy of the tiny model whose config (and tokenizer) point at code in a module the folder lacks."""
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "cptkit_custom_llama"
    config["auto_map"] = {
        "AutoConfig": "modeling_custom.Config",
        "AutoModelForCausalLM": "modeling_custom.Model",
    }
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer_too:
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        tok["tokenizer_class"] = "CustomTokenizer"
        tok["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
        (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


def _pickled_weights_model(tiny_model_dir, folder):
    """A copy of the tiny model whose weights are a pytorch_model.bin that also pickles a custom object."""
    from safetensors.torch import load_file

    shutil.copytree(tiny_model_dir, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "payload": Payload()}, folder / "pytorch_model.bin")
    return folder


@pytest.fixture
def custom_code(tiny_model_dir, tmp_path):
    return _custom_code_model(tiny_model_dir, tmp_path / "custom")


@pytest.fixture
def pickled(tiny_model_dir, tmp_path):
    return _pickled_weights_model(tiny_model_dir, tmp_path / "pickled")


def test_train_refuses_custom_code_with_the_setting_that_allows_it(custom_code):
    from cptkit.model.load import load_model_and_tokenizer, load_model_config, load_tokenizer

    cfg = ModelConfig(name_or_path=str(custom_code))
    for load in (
        lambda: load_tokenizer(cfg),
        lambda: load_model_config(cfg),
        lambda: load_model_and_tokenizer(cfg, TrainConfig(mode="full"), tokenizer=object()),
    ):
        with pytest.raises(Refused, match=r"custom code\); set model.trust_remote_code: true if you trust"):
            load()
    trusted = ModelConfig(name_or_path=str(custom_code), trust_remote_code=True)
    with pytest.raises(CptkitError, match=f"{custom_code}.*cannot be loaded: .*modeling_custom.py"):
        load_model_config(trusted)  # allowed, but the module it names is not there: a message too


def test_train_preflight_refuses_a_model_config_that_needs_code(tiny_model_dir, tiny_tokenizer, tmp_path):
    from cptkit.testing.stages import write_prepared
    from cptkit.train.checks import preflight

    prepared = write_prepared(tmp_path / "data", {"dom": ("domain", ["some text " * 20])}, tiny_tokenizer)
    model = _custom_code_model(tiny_model_dir, tmp_path / "custom", tokenizer_too=False)
    with pytest.raises(
        Refused, match="its config\\): needs its own Python code.*model.trust_remote_code: true"
    ):
        preflight(TrainConfig(mode="full"), ModelConfig(name_or_path=str(model)), prepared, tmp_path / "out")


def test_pickled_model_weights_are_refused_with_what_to_do(pickled):
    from cptkit.eval.models import load_model
    from cptkit.model.load import load_model_and_tokenizer

    with pytest.raises(
        Refused, match=r"holds a pickled .*Payload.*could run code.*convert it to safetensors"
    ):
        load_model_and_tokenizer(
            ModelConfig(name_or_path=str(pickled)), TrainConfig(mode="full"), tokenizer=object()
        )
    with pytest.raises(Refused, match=rf"{pickled}: the model: holds a pickled .*Payload"):
        load_model(pickled, torch.device("cpu"), torch.float32)


def test_eval_refuses_custom_code_unless_trusted(custom_code):
    from cptkit.eval.models import load_model, load_tokenizer

    with pytest.raises(Refused, match="the model: needs its own Python code.*model.trust_remote_code: true"):
        load_model(custom_code, torch.device("cpu"), torch.float32)
    with pytest.raises(
        Refused, match="the tokenizer: needs its own Python code.*model.trust_remote_code: true"
    ):
        load_tokenizer(custom_code)
    with pytest.raises(CptkitError, match="cannot be loaded: .*modeling_custom.py"):
        load_model(custom_code, torch.device("cpu"), torch.float32, trust_remote_code=True)


def test_pickled_adapter_is_refused_by_merge_and_eval(tiny_model_dir, tmp_path):
    from cptkit.eval.models import load_model
    from cptkit.merge.adapter import read_adapter
    from cptkit.testing.stages import make_lora_adapter

    adapter = make_lora_adapter(tiny_model_dir, tmp_path / "adapter")
    from safetensors.torch import load_file

    state = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({**state, "payload": Payload()}, adapter / "adapter_model.bin")
    with pytest.raises(
        Refused, match=rf"merge.adapter: {adapter / 'adapter_model.bin'}: holds a pickled .*Payload"
    ):
        read_adapter(adapter)
    with pytest.raises(Refused, match=rf"{adapter}: the adapter: holds a pickled .*Payload"):
        load_model(tiny_model_dir, torch.device("cpu"), torch.float32, adapter=adapter)


def _checkpoint(folder):
    """The pickled files of a checkpoint as the Trainer writes them (numpy in the RNG state)."""
    folder.mkdir()
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight])
    weight.sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save({"last_epoch": 1, "_last_lr": [1e-3]}, folder / "scheduler.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    torch.save(rng, folder / "rng_state.pth")
    torch.save(Payload(), folder / "training_args.bin")  # a pickled object that resuming never loads
    return folder


def test_resume_refuses_a_pickled_checkpoint_file_and_names_it(tmp_path):
    from cptkit.model.pickles import check_resumable

    checkpoint = _checkpoint(tmp_path / "checkpoint-10")
    check_resumable(checkpoint)  # what the Trainer writes passes
    check_resumable(None)
    torch.save({"state": {}, "param_groups": [], "extra": Payload()}, checkpoint / "optimizer.pt")
    with pytest.raises(
        Refused, match=rf"checkpoint file {checkpoint / 'optimizer.pt'}: holds a pickled .*Payload"
    ):
        check_resumable(checkpoint)
    (checkpoint / "optimizer.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CptkitError, match=r"optimizer.pt cannot be read .*the checkpoint is damaged"):
        check_resumable(checkpoint)


def test_cli_prints_one_error_line_for_a_model_with_custom_code(custom_code, tmp_path):
    text = tmp_path / "set.txt"
    text.write_text("a short text to score " * 10, encoding="utf-8")
    config = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(custom_code)},
        "eval": {
            "models": [{"name": "base", "path": str(custom_code)}],
            "extra_texts": [{"name": "t", "path": str(text)}],
            "device": "cpu",
            "seq_length": 64,
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "cptkit", "eval", str(tmp_path / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cptkit eval: error: ") and "set model.trust_remote_code: true" in last

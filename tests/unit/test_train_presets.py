"""Every shipped accelerate config loads with accelerate's own reader."""

import json

import pytest

from cptkit.presets.accelerate import PRESETS, path


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_accelerate_preset_loads(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path(name)))
    assert config.num_machines == 1 and config.mixed_precision == "bf16"
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
        ds = json.loads(path(f"ds_{name}.json").read_text())
        assert ds["zero_optimization"]["stage"] == int(name[-1])
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2


@pytest.mark.parametrize(
    ("env", "sharded"),
    [
        ({}, False),
        ({"ACCELERATE_USE_FSDP": "true"}, True),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, False),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, False),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, True),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, True),  # stage unknown: assume the weights are sharded
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds_zero1.json"}, False),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds_zero3.json"}, True),
    ],
)
def test_fused_loss_stays_on_unless_the_weights_are_sharded(monkeypatch, env, sharded):
    """liger's fused loss reads lm_head.weight whole: off under FSDP and ZeRO-3, on under ZeRO-1/2, whose
    weights stay whole (turning it off there costs ~18 GiB of logits on an 8B model)."""
    from cptkit.model.load import _weights_sharded

    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(path(value)) if value.endswith(".json") else value)
    assert _weights_sharded() is sharded

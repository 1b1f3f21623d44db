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

"""Optional packages a config needs are checked before anything loads, with the extra to install."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cptkit.config import Config, build_config
from cptkit.config.model import ModelConfig
from cptkit.config.train import TrainConfig
from cptkit.errors import CptkitError
from cptkit.train.checks import preflight
from cptkit.train.optional import check_optional_dependencies, is_installed, optional_needs


def nothing_installed(module: str) -> bool:
    return False


def test_each_setting_names_the_package_it_needs():
    cfg = TrainConfig(
        mode="qlora",
        fused_cross_entropy="on",
        report_to=["wandb", "mlflow", "tensorboard"],
        hf={"deepspeed": "ds.json"},
    )
    needs = optional_needs(cfg, ModelConfig(name_or_path="m", attention="flash_attention_2"))
    assert needs == {
        "bitsandbytes": "train.mode: qlora",
        "deepspeed": "train.hf.deepspeed",
        "liger-kernel": "train.fused_cross_entropy: on",
        "flash-attn": "model.attention: flash_attention_2",
        "wandb": "train.report_to: [wandb]",
        "mlflow": "train.report_to: [mlflow]",
        "tensorboard": "train.report_to: [tensorboard]",
    }


def test_defaults_need_only_what_is_always_installed():
    """auto fused cross-entropy and auto attention use liger/flash only where installed: no need."""
    needs = optional_needs(TrainConfig(report_to=["none"]), ModelConfig(name_or_path="m"))
    assert needs == {}
    check_optional_dependencies(
        TrainConfig(report_to=["none"]), ModelConfig(name_or_path="m"), installed=nothing_installed
    )


def test_every_missing_package_is_listed_with_what_needs_it_and_the_extra():
    cfg = TrainConfig(mode="qlora", report_to=["wandb", "mlflow"], hf={"deepspeed": "ds.json"})
    with pytest.raises(CptkitError) as info:
        check_optional_dependencies(cfg, None, section="sft", installed=nothing_installed)
    message = str(info.value)
    assert 'sft.mode: qlora needs bitsandbytes (pip install "cptkit[qlora]")' in message
    assert 'sft.hf.deepspeed needs deepspeed (pip install "cptkit[gpu]")' in message
    assert 'sft.report_to: [wandb] needs wandb (pip install "cptkit[wandb]")' in message
    assert 'sft.report_to: [mlflow] needs mlflow (pip install "cptkit[mlflow]")' in message


def test_installed_packages_pass():
    cfg = TrainConfig(mode="qlora", report_to=["wandb"])
    check_optional_dependencies(cfg, None, installed=lambda module: True)


def test_the_extras_named_exist_in_pyproject():
    from pathlib import Path

    import tomllib

    from cptkit.train.optional import OPTIONAL_PACKAGES

    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for package, (_module, install) in OPTIONAL_PACKAGES.items():
        if "cptkit[" in install:
            extra = install.split("[")[1].split("]")[0]
            assert any(dep.startswith(package) for dep in extras[extra]), (package, extra)


@pytest.mark.skipif(is_installed("wandb"), reason="checks a machine without wandb")
def test_train_preflight_refuses_a_missing_tracker_before_reading_anything(tmp_path):
    """The dataset and the model do not exist either: the missing package is what is reported first,
    before any folder, tokenizer or model is read."""
    cfg = build_config(
        Config,
        {"run_dir": str(tmp_path), "model": {"name_or_path": "m"}, "train": {"report_to": ["wandb"]}},
    )
    with pytest.raises(CptkitError, match=r"train.report_to: \[wandb\] needs wandb"):
        preflight(cfg.train, cfg.model, tmp_path / "no-dataset", tmp_path / "out")


@pytest.mark.skipif(is_installed("deepspeed"), reason="checks a machine without deepspeed")
def test_launch_scripts_can_ask_before_accelerate_launch():
    out = subprocess.run(
        [sys.executable, "-m", "cptkit.train.optional", "deepspeed"], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert out.stderr.strip() == 'missing optional package(s): deepspeed (pip install "cptkit[gpu]")'
    ok = subprocess.run([sys.executable, "-m", "cptkit.train.optional", "tensorboard"], capture_output=True)
    assert ok.returncode == 0


SCRIPT = Path(__file__).parents[2] / "examples" / "run_7b_cpt.sh"


def _overrides(block_name: str, values: dict[str, str]) -> list[str]:
    script = SCRIPT.read_text()
    start = script.index(f"{block_name}=(")
    block = script[start : script.index("\n  )\n" if block_name != "args" else "\n)\n", start)]
    return [
        re.sub(r"\$\{(\w+)(:-([^}]*))?\}", lambda m: values.get(m.group(1), m.group(3) or ""), found)
        for found in re.findall(r'^\s*"([^"]+)"', block, flags=re.M)
    ]


def test_example_script_checks_the_gpu_packages_before_launching_and_has_a_cpu_branch():
    script = SCRIPT.read_text()
    check = script.index("python -m cptkit.train.optional bitsandbytes deepspeed")
    assert check < script.index("accelerate launch")
    assert script.index("cptkit run") < check  # the CPU branch needs neither


def test_example_script_cpu_overrides_are_valid_config(tmp_path):
    """Without a GPU the script runs the seed recipe with its CPU overrides: all valid keys, and a
    config that trains LoRA in float32 for a few steps (what a CPU can run)."""
    from cptkit import presets
    from cptkit.config import load_config

    (tmp_path / "domain").mkdir()
    values = {
        "output_path": str(tmp_path / "output"),
        "base_model_path": "HuggingFaceTB/SmolLM2-135M",
        "sources": f"[{{name: domain, path: '{tmp_path / 'domain'}', role: domain, weight: 1.0}}]",
    }
    overrides = _overrides("args", values) + _overrides("cpu_args", values)
    cfg = load_config(Config, presets.path("seed-llama3-8b-qlora"), overrides)
    assert (cfg.train.mode, cfg.model.dtype, cfg.merge.dtype) == ("lora", "float32", "float32")
    assert cfg.train.hf["bf16"] is False and cfg.train.hf["max_steps"] == 20
    assert optional_needs(cfg.train, cfg.model) == {"tensorboard": "train.report_to: [tensorboard]"}

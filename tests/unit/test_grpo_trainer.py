"""trl.GRPOConfig as cptkit builds it from the grpo section, and the checks of `grpo.hf` at config time."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cptkit.config import Config, load_config
from cptkit.config.grpo import GrpoConfig, RewardConfig
from cptkit.errors import ConfigError, CptkitError
from cptkit.grpo.trainer import grpo_arguments, grpo_settings


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "2+3?", "answer": "5"}) + "\n")
    return path


def section(prompts, **fields) -> GrpoConfig:
    return GrpoConfig(prompts=str(prompts), rewards=[RewardConfig(type="exact", weight=2.0)], **fields)


def test_the_grpo_section_sets_the_fields_it_owns(prompts, tmp_path):
    cfg = section(
        prompts,
        num_generations=4,
        beta=0.1,
        max_completion_length=32,
        temperature=0.7,
        top_p=0.9,
        report_to=["none"],
        hf={"max_steps": 3, "learning_rate": 3e-5},
    )
    args = grpo_arguments(cfg, tmp_path / "out", on_gpu=False, dtype=torch.float32, seed=7)
    assert (args.num_generations, args.beta, args.max_completion_length) == (4, 0.1, 32)
    assert (args.temperature, args.top_p, args.reward_weights) == (0.7, 0.9, [2.0])
    assert (args.max_steps, args.learning_rate, args.seed) == (3, 3e-5, 7)
    assert args.output_dir == str(tmp_path / "out") and args.report_to in ([], "none", ["none"])
    assert not args.use_vllm and not args.gradient_checkpointing  # the memory plan checkpoints
    # one prompt's group of completions per micro-batch unless grpo.hf says otherwise
    assert args.per_device_train_batch_size == 4 and args.generation_batch_size == 4
    assert args.logging_steps == 1


def test_learning_rate_default_follows_the_mode(prompts):
    full = grpo_settings(section(prompts, mode="full"), on_gpu=False, dtype=torch.float32)
    lora = grpo_settings(section(prompts, mode="lora"), on_gpu=False, dtype=torch.float32)
    assert full["learning_rate"] < lora["learning_rate"]


@pytest.mark.parametrize(
    ("key", "use"),
    [
        ("num_generations", "grpo.num_generations"),
        ("beta", "grpo.beta"),
        ("use_vllm", "grpo.generation"),
        ("reward_weights", "grpo.rewards[].weight"),
        ("lr_scheduler_type", "grpo.schedule.type"),
        ("output_dir", "grpo.output_dir"),
    ],
)
def test_owned_keys_in_hf_are_refused_naming_the_grpo_key(prompts, key, use):
    problems = section(prompts, hf={key: 1}).check("grpo")
    assert (f"grpo.hf.{key}", f"set by cptkit; use {use} instead") in problems


def write_config(tmp_path, prompts, hf) -> str:
    path = tmp_path / "config.yaml"
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "unused"},
        "grpo": {"prompts": str(prompts), "rewards": [{"type": "exact"}], "hf": hf},
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_hf_is_checked_against_grpo_config_with_the_yaml_path(tmp_path, prompts):
    config = write_config(tmp_path, prompts, {"num_iteration": 2, "epsilon": "0.2", "max_steps": 5})
    with pytest.raises(ConfigError) as e:
        load_config(Config, config)
    text = str(e.value)
    assert "grpo.hf.num_iteration" in text and "not a trl.GRPOConfig field" in text
    assert "did you mean 'num_iterations'" in text
    assert "grpo.hf.epsilon" in text and "remove the quotes" in text
    assert "max_steps" not in text
    # GRPOConfig's own fields are accepted (TrainingArguments does not know them)
    ok = write_config(tmp_path, prompts, {"num_iterations": 2, "epsilon": 0.3, "loss_type": "grpo"})
    assert load_config(Config, ok).grpo.hf["num_iterations"] == 2


def test_a_batch_that_splits_a_group_is_refused_with_its_yaml_path(tmp_path, prompts):
    config = write_config(tmp_path, prompts, {"per_device_train_batch_size": 6})
    with pytest.raises(ConfigError) as e:
        load_config(Config, config)
    text = str(e.value)
    assert "grpo.hf.per_device_train_batch_size" in text
    assert "(per_device_train_batch_size 6 x 1 process(es) x gradient_accumulation_steps 1 = 6)" in text
    assert "multiple of grpo.num_generations (8)" in text
    assert text.count("divisible") == 0  # GRPOConfig's own message (no YAML path) is left out
    good = write_config(
        tmp_path, prompts, {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    )
    assert load_config(Config, good).grpo.hf["gradient_accumulation_steps"] == 2


def test_generation_batch_size_that_splits_a_group_names_itself(prompts, tmp_path):
    cfg = section(
        prompts, num_generations=4, hf={"per_device_train_batch_size": 2, "generation_batch_size": 6}
    )
    problems = cfg.check("grpo")
    assert any(where == "grpo.hf.generation_batch_size" and "= 6" in what for where, what in problems)
    with pytest.raises(CptkitError, match="grpo.hf.generation_batch_size"):
        grpo_arguments(cfg, tmp_path, on_gpu=False, dtype=torch.float32)


def test_vllm_without_vllm_is_refused(prompts, tmp_path, monkeypatch):
    monkeypatch.setattr("cptkit.generate.vllm_installed", lambda: False)
    with pytest.raises(CptkitError, match="grpo.generation: vllm, but vLLM is not installed"):
        grpo_arguments(section(prompts, generation="vllm"), tmp_path, on_gpu=True, dtype=torch.float32)


def test_missing_trl_is_a_message_with_what_to_install(prompts, monkeypatch):
    import builtins

    real = builtins.__import__

    def without_trl(name, *args, **kwargs):
        if name == "trl" or name.startswith("trl."):
            raise ImportError("No module named 'trl'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_trl)
    problems = section(prompts).check("grpo")
    assert any(where == "grpo" and "pip install trl" in what for where, what in problems)

"""The pieces of `cptkit plan`: FLOPs from a shape, the steps as the Trainer counts them, the GPU
catalog, and the speed predicted from the calibration table."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

from cptkit.config.train import TrainConfig
from cptkit.errors import CptkitError
from cptkit.model.flops import flops_per_token, flops_per_token_of_shape
from cptkit.model.shape import shape_from_config, shape_of_model
from cptkit.plan.calibration import Calibration
from cptkit.plan.gpus import CATALOG, gpu_named
from cptkit.plan.speed import predict_speed, run_flops_per_token
from cptkit.plan.steps import plan_steps
from cptkit.plan.tokens import DataTokens, SourceTokens
from cptkit.testing.shapes import LLAMA3_8B as LLAMA3_8B_SHAPE
from cptkit.train.memory import MemorySetup, RunShape, plan_memory

LLAMA3_8B = LlamaConfig(**LLAMA3_8B_SHAPE)


@pytest.mark.parametrize(
    ("mode", "targets"), [("full", "all-linear"), ("lora", "all-linear"), ("lora", ["q_proj", "v_proj"])]
)
def test_flops_from_a_shape_count_what_flops_per_token_counts_on_the_model(tiny_model_dir, mode, targets):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shape = shape_of_model(model)
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    expected = flops_per_token(model, seq_length=64)
    assert flops_per_token_of_shape(shape, 64, mode, lora_r=4, lora_targets=targets) == expected


def data_of(rows: int, seq_length: int = 100) -> DataTokens:
    source = SourceTokens(
        "domain", "domain", 1.0, 10, rows * seq_length, 0, rows * seq_length, rows * seq_length
    )
    return DataTokens({"domain": source}, seq_length, rows, 1.0, "test", exact=True)


def test_steps_are_counted_as_the_trainer_counts_them():
    train = TrainConfig(
        hf={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 4, "num_train_epochs": 2}
    )
    steps = plan_steps(train, data_of(100), world_size=2)
    # ceil(100 / (8 x 2)) = 7 batches an epoch, ceil(7 / 4) = 2 updates an epoch, x 2 epochs
    assert steps.optimizer_steps == 4 and steps.rows_per_step == 64 and steps.epochs == 2
    capped = plan_steps(TrainConfig(hf={"max_steps": 30, "per_device_train_batch_size": 10}), data_of(100))
    assert capped.optimizer_steps == 30 and capped.epochs == 3 and capped.from_max_steps
    assert capped.total_tokens == 3 * 100 * 100 and capped.source_epochs == {"domain": 3}


def test_gpu_names_are_matched_loosely_and_an_unknown_one_lists_them():
    assert gpu_named("H100_80GB") is CATALOG["h100-80gb"]
    with pytest.raises(CptkitError, match="rtx4090"):
        gpu_named("h300")


def test_the_shipped_table_predicts_its_own_measured_row_back():
    """The 8B LoRA run without checkpointing on the H200 it was measured on: the table's tokens/s again,
    which holds only if the shape's FLOPs are the ones the bench counted."""
    calibration = Calibration.load()
    shape = shape_from_config(LLAMA3_8B)
    train = TrainConfig(mode="lora")
    setup = MemorySetup.from_config(train, RunShape(2048, 8), True, True, True)
    plan = plan_memory(shape, setup, budget_bytes=200 * 2**30, forced=False)
    flops = run_flops_per_token(train, shape, 2048)
    assert flops == flops_per_token_of_shape(shape, 2048, "lora", 16, "all-linear")
    speed = predict_speed(calibration, CATALOG["h200"], plan, train, shape, flops, 10**9)
    assert speed.row.variant == "cptkit-lora-default"
    assert speed.tokens_per_second == pytest.approx(15_105, rel=0.01)
    assert speed.hours == pytest.approx(10**9 / speed.tokens_per_second / 3600)
    assert "another GPU" not in speed.how
    on_a100 = predict_speed(calibration, CATALOG["a100-80gb"], plan, train, shape, flops, 1)
    assert on_a100.tokens_per_second == pytest.approx(speed.tokens_per_second * 312 / 989)
    assert "a prediction from another GPU" in on_a100.how


def test_a_checkpointing_kind_not_measured_scales_the_unchecked_row_by_the_plans_step_time():
    calibration = Calibration.load()
    shape = shape_from_config(LLAMA3_8B)
    setup = MemorySetup.from_config(TrainConfig(mode="lora"), RunShape(2048, 8), True, True, True)
    full = plan_memory(shape, setup, budget_bytes=200 * 2**30, forced=False)
    budget = (full.estimate.total + plan_memory(shape, setup, 200 * 2**30, forced=True).estimate.total) // 2
    some = plan_memory(shape, setup, budget_bytes=budget)
    assert some.checkpointing == "some"
    speed = predict_speed(calibration, CATALOG["h200"], some, TrainConfig(mode="lora"), shape, 1e10, 1)
    # no LoRA row recomputes some blocks: the no-checkpointing row over the plan's step time
    assert speed.row.variant == "cptkit-lora-default"
    assert speed.mfu == pytest.approx(speed.row.mfu / some.relative_time)
    assert "over the plan's step time" in speed.how
    full = predict_speed(calibration, CATALOG["h200"], some, TrainConfig(mode="full"), shape, 1e10, 1)
    assert full.row.variant == "cptkit-full-1b-default"  # the only full row, of another size
    empty = dataclasses.replace(calibration, rows=tuple(r for r in calibration.rows if r.mode != "full"))
    none = predict_speed(empty, CATALOG["h200"], some, TrainConfig(mode="full"), shape, 1e10, 1)
    assert none.tokens_per_second is None and "no full row" in none.how

"""Applying a memory plan: every way of checkpointing (none, some blocks, all, all offloaded) gives the
same loss and the same gradients as no checkpointing, for LoRA, QLoRA and full fine-tuning, and only the
blocks the plan names recompute."""

from __future__ import annotations

import math

import pytest
import torch

from cptkit.config.model import ModelConfig
from cptkit.config.train import TrainConfig
from cptkit.model.load import load_model_and_tokenizer
from cptkit.model.shape import decoder_blocks, shape_of_model
from cptkit.testing.tiny import make_tiny_llama
from cptkit.train.checkpointing import apply_memory_plan, checkpoint_blocks
from cptkit.train.memory import PREDICTION_HEADROOM, MemorySetup, RunShape, estimate_memory

LAYERS = 4
SHAPE = RunShape(seq_length=24, micro_batch=2)
PLANS = {
    "none": ((), False),
    "some": ((1, 3), False),
    "all": (tuple(range(LAYERS)), False),
    "offload": (tuple(range(LAYERS)), True),
}


@pytest.fixture(autouse=True)
def _global_rng_as_it_was():
    """These tests seed torch's global generator; the tests after them find it as they left it."""
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory, tiny_tokenizer):
    # hidden 64: bitsandbytes' CPU 4-bit kernels need input features of at least one block (64)
    folder = tmp_path_factory.mktemp("four-blocks")
    with torch.random.fork_rng(devices=[]):
        return make_tiny_llama(folder, tokenizer=tiny_tokenizer, hidden_size=64, num_layers=LAYERS)


def load(folder, mode: str, **train):
    torch.manual_seed(0)  # the same LoRA initialisation in every load
    train_cfg = TrainConfig(mode=mode, gradient_checkpointing=False, **train)
    model = load_model_and_tokenizer(ModelConfig(name_or_path=str(folder), dtype="float32"), train_cfg).model
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A's gradient zero too
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn(param.shape, generator=gen))
    return model.train()


def batch(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (SHAPE.micro_batch, SHAPE.seq_length), generator=gen)
    positions = torch.tensor([[*range(10), *range(14)], [*range(24)]])  # two documents packed in row 0
    return {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}


def loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch(model.config.vocab_size)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def count_block_forwards(model) -> list[int]:
    """Calls of each block's MLP: once in the forward, once more in a recompute (counted as it starts:
    a recompute stops once it has made the last tensor the backward needs, inside the MLP)."""
    counts = [0] * LAYERS
    for index, block in enumerate(decoder_blocks(model)):
        block.mlp.register_forward_pre_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_every_plan_gives_the_loss_and_gradients_of_no_checkpointing(four_blocks, mode):
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    plain_loss, plain_grads = loss_and_grads(load(four_blocks, mode))
    assert any(g.abs().sum() > 0 for g in plain_grads.values())
    for name, (layers, offload) in PLANS.items():
        model = load(four_blocks, mode)
        checkpoint_blocks(model, layers, offload=offload)
        counts = count_block_forwards(model)
        loss, grads = loss_and_grads(model)
        assert counts == [2 if i in layers else 1 for i in range(LAYERS)], name
        torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=0)
        assert grads.keys() == plain_grads.keys()
        for param, grad in grads.items():
            torch.testing.assert_close(grad, plain_grads[param], atol=1e-6, rtol=1e-5, msg=f"{name}: {param}")


def test_a_forward_without_gradients_runs_each_block_once_under_any_plan(four_blocks):
    # the KL-to-base term's extra forward of the base runs under no_grad: nothing to recompute
    model = load(four_blocks, "lora")
    with torch.no_grad():
        plain = model(**batch(model.config.vocab_size)).logits
    checkpoint_blocks(model, range(LAYERS), offload=True)
    counts = count_block_forwards(model)
    with torch.no_grad():
        logits = model(**batch(model.config.vocab_size)).logits
    assert counts == [1] * LAYERS
    torch.testing.assert_close(logits, plain)


def budget_for(model, train_cfg, checkpointed: int) -> int:
    """A budget that the estimate with `checkpointed` blocks fits and the one with one fewer does not
    (auto keeps PREDICTION_HEADROOM of it free)."""
    setup = MemorySetup.from_config(
        train_cfg, SHAPE, fused_cross_entropy=False, fast_lora=True, fused_mlp=True, dtype_bytes=4
    )
    return math.ceil(
        estimate_memory(shape_of_model(model), setup, checkpointed).total / (1 - PREDICTION_HEADROOM)
    )


def flags(model) -> list[bool]:
    return [block.gradient_checkpointing for block in decoder_blocks(model)]


def test_auto_checkpoints_the_blocks_the_plan_names(four_blocks):
    for checkpointed, kind in ((0, "none"), (2, "some"), (LAYERS, "all")):
        model = load(four_blocks, "lora")
        budget = budget_for(model, TrainConfig(mode="lora"), checkpointed)
        cfg = TrainConfig(mode="lora", memory_budget=f"{budget}B")
        plan = apply_memory_plan(model, cfg, SHAPE, fused_cross_entropy=False)
        assert plan.checkpointing == kind and len(plan.checkpointed_layers) == checkpointed
        assert flags(model) == [i in plan.checkpointed_layers for i in range(LAYERS)]
        counts = count_block_forwards(model)
        loss_and_grads(model)
        assert counts == [2 if i in plan.checkpointed_layers else 1 for i in range(LAYERS)]


def test_a_budget_below_every_plan_offloads_and_warns(four_blocks, caplog):
    model = load(four_blocks, "lora")
    plan = apply_memory_plan(model, TrainConfig(mode="lora", memory_budget="1KiB"), SHAPE, False)
    assert plan.checkpointing == "offload" and not plan.fits
    assert "exceeds train.memory_budget" in caplog.text and "per_device_train_batch_size" in caplog.text
    assert all(flags(model))


def test_cpu_without_a_budget_plans_nothing_and_true_and_false_still_force(four_blocks):
    model = load(four_blocks, "lora")
    assert apply_memory_plan(model, TrainConfig(mode="lora"), SHAPE, False) is None
    assert not any(flags(model))
    model = load(four_blocks, "lora")
    assert (
        apply_memory_plan(model, TrainConfig(mode="lora", gradient_checkpointing=True), SHAPE, False) is None
    )
    assert all(flags(model))
    model = load(four_blocks, "lora")
    cfg = TrainConfig(mode="lora", gradient_checkpointing=False, memory_budget="1KiB")
    plan = apply_memory_plan(model, cfg, SHAPE, False)
    assert plan.forced and plan.checkpointing == "none" and not any(flags(model))
    assert plan.warnings  # estimated and over budget all the same


def test_a_plan_of_no_blocks_switches_checkpointing_off_again(four_blocks):
    model = load(four_blocks, "lora")
    checkpoint_blocks(model, range(LAYERS), offload=True)
    checkpoint_blocks(model, ())
    assert not any(flags(model))
    counts = count_block_forwards(model)
    loss_and_grads(model)
    assert counts == [1] * LAYERS

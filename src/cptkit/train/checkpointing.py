"""Gradient checkpointing as the memory plan decides it: none, some decoder blocks, all, or all with
their inputs offloaded to CPU memory.

transformers' decoder blocks (GradientCheckpointingLayer) each carry a `gradient_checkpointing` flag and
the `_gradient_checkpointing_func` they recompute through: checkpointing is enabled on the model
(non-reentrant), then switched off on the blocks the plan leaves alone, and an offloading plan gives
its blocks a function that keeps their inputs in pinned CPU memory."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch

from cptkit.errors import CptkitError
from cptkit.model.fast_lora import fast_lora_status, lora_layers
from cptkit.model.shape import decoder_blocks, shape_of_model
from cptkit.train.memory import (
    MemoryPlan,
    MemorySetup,
    RunShape,
    estimate_memory,
    expected_setup,
    gib,
    parse_budget,
    plan_memory,
)

log = logging.getLogger(__name__)


def apply_memory_plan(
    model: Any,
    train_cfg: Any,
    run_shape: RunShape | None,
    fused_cross_entropy: bool,
    fast_lora: bool | None = None,
    fused_mlp: bool | None = None,
) -> MemoryPlan | None:
    """Checkpoint the decoder blocks of `model` as `train.gradient_checkpointing` says and return the
    MemoryPlan applied. auto plans on a GPU (and on CPU with an explicit train.memory_budget, so plans can
    be tested there); without a plan auto means no checkpointing on CPU, true all blocks, false none.
    `fast_lora`/`fused_mlp` say which fused paths the model runs where the model does not show it
    (default: read from the model, `kernels_in_use`)."""
    forced = None if train_cfg.gradient_checkpointing == "auto" else bool(train_cfg.gradient_checkpointing)
    budget = budget_bytes(train_cfg.memory_budget, training_gpu())
    if budget is None or run_shape is None:
        checkpoint_blocks(model, range(len(decoder_blocks(model))) if forced else ())
        return None
    kernels = kernels_in_use(model, train_cfg)
    setup = MemorySetup.from_config(
        train_cfg,
        run_shape,
        fused_cross_entropy=fused_cross_entropy,
        fast_lora=kernels["fast_lora"] if fast_lora is None else fast_lora,
        fused_mlp=kernels["fused_mlp"] if fused_mlp is None else fused_mlp,
        dtype_bytes=_compute_bytes(model),
        fused_norm=kernels["fused_norm"],
        fused_swiglu=kernels["fused_swiglu"],
        shards=weight_shards(),
    )
    plan = plan_memory(shape_of_model(model), setup, budget, forced=forced)
    checkpoint_blocks(model, plan.checkpointed_layers, offload=plan.checkpointing == "offload")
    log.info(plan.describe())
    for warning in plan.warnings:
        log.warning(warning)
    return plan


def check_plan_fits(model_cfg: Any, train_cfg: Any, run_shape: RunShape) -> None:
    """Before the model loads, on a GPU: refuse a run that does not fit the GPU's whole memory even
    with every block checkpointed and offloaded (from the model's shape on the meta device, with the
    fused kernels the config allows, so only a run that cannot fit is refused)."""
    from cptkit.model.load import _sharded, load_model_config, use_fused_cross_entropy

    if not torch.cuda.is_available() or _sharded() or train_cfg.hf.get("deepspeed"):
        # DeepSpeed and FSDP place, shard and may offload the weights and states themselves (their
        # settings are not all known here): the plan made after loading still applies and warns
        return
    from cptkit.model.shape import shape_from_config

    setup = expected_setup(train_cfg, run_shape, use_fused_cross_entropy(train_cfg), shards=weight_shards())
    total = torch.cuda.get_device_properties(training_gpu()).total_memory
    shape = shape_from_config(load_model_config(model_cfg), trust_remote_code=model_cfg.trust_remote_code)
    problem = unfittable(shape, setup, total)
    if problem:
        raise CptkitError(problem)


def unfittable(shape: Any, setup: MemorySetup, gpu_total_bytes: int) -> str | None:
    """Why a run of `setup` cannot train on a GPU of `gpu_total_bytes` whatever the plan, or None."""
    least = estimate_memory(shape, setup, shape.layers, offload=True).total
    if least <= gpu_total_bytes:
        return None
    return (
        f"train: needs at least {gib(least)} of GPU memory with every block checkpointed and offloaded "
        f"({setup.micro_batch} x {setup.seq_length} tokens a micro-batch, mode {setup.mode}), and the GPU "
        f"holds {gib(gpu_total_bytes)}: lower train.hf.per_device_train_batch_size (and raise "
        "gradient_accumulation_steps), the sequence length, or use mode: qlora; train.memory_budget "
        "cannot raise what the GPU holds"
    )


def weight_shards() -> int:
    """How many processes share each weight: the world size under FSDP or DeepSpeed ZeRO-3, else 1."""
    from cptkit.model.load import _weights_sharded

    return int(os.environ.get("WORLD_SIZE", "1")) if _weights_sharded() else 1


def budget_bytes(memory_budget: str | None, device: torch.device | None) -> int | None:
    """The plan's budget: train.memory_budget, else the GPU's memory less the margin (at most what this
    process can still get on it); None on CPU without a budget (no plan)."""
    on_gpu = device is not None and device.type == "cuda"
    if not on_gpu and memory_budget is None:
        return None
    total = torch.cuda.get_device_properties(device).total_memory if on_gpu else 0
    try:
        budget = parse_budget(memory_budget, total)
    except ValueError as e:
        raise CptkitError(f"train.memory_budget: {e}") from None
    if memory_budget is not None and total == 0 and budget == 0:
        raise CptkitError(
            f"train.memory_budget: {memory_budget} is a fraction of the GPU's memory, and there is no GPU"
        )
    if on_gpu and memory_budget is None:
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free + torch.cuda.memory_reserved(device))
    return budget


def kernels_in_use(model: Any, train_cfg: Any) -> dict[str, bool]:
    """Which fused paths change what the blocks keep: liger's RMSNorm and SwiGLU (seen on the model:
    liger renames the modules it patches) and cptkit's fused LoRA path and MLP (seen on the model: every
    LoRA layer routed, `cptkit.model.fast_lora.fast_lora_status`)."""
    blocks = decoder_blocks(model)
    block = blocks[0] if blocks else None

    def liger(name: str) -> bool:
        module = getattr(block, name, None)
        return module is not None and "Liger" in module._get_name()

    routed = fast_lora_status(model) if train_cfg.mode != "full" else {"layers": 0, "mlps": 0}
    return {
        "fused_norm": liger("input_layernorm"),
        "fused_swiglu": liger("mlp"),
        "fused_mlp": bool(routed["mlps"]),
        "fast_lora": bool(routed["layers"]) and routed["layers"] == len(lora_layers(model)),
    }


def checkpoint_blocks(model: Any, layers: Iterable[int], offload: bool = False) -> None:
    """Recompute the decoder blocks numbered `layers` in the backward (non-reentrant checkpointing),
    their inputs kept in pinned CPU memory when `offload`; every other block keeps its activations."""
    chosen = set(layers)
    if not chosen:
        for block in decoder_blocks(model):
            if getattr(block, "gradient_checkpointing", False):
                block.gradient_checkpointing = False
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name goes in v6
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    blocks = decoder_blocks(model)
    if not all(hasattr(block, "gradient_checkpointing") for block in blocks):
        log.warning("%s has no per-block checkpointing: all blocks recompute", type(model).__name__)
        return
    for index, block in enumerate(blocks):
        block.gradient_checkpointing = index in chosen
        if offload and index in chosen:
            block._gradient_checkpointing_func = offloaded_checkpoint


def offloaded_checkpoint(function: Any, *args: Any, **kwargs: Any) -> Any:
    """torch's non-reentrant checkpoint of `function`, the block inputs it keeps for the recompute held
    in CPU memory (pinned, copied on a side stream) instead of on the GPU."""
    from torch.utils.checkpoint import checkpoint

    with torch.autograd.graph.saved_tensors_hooks(_to_cpu, _from_cpu):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


_copy_streams: dict[torch.device, Any] = {}


def _to_cpu(tensor: torch.Tensor) -> Any:
    """A CPU copy of a saved block input. From a GPU: into pinned memory on a side stream that first
    waits for the tensor's producer; the tensor is marked as used there so the allocator keeps it until
    the copy is done, and the event tells the backward when the copy may be read."""
    if tensor.device.type != "cuda":
        return tensor.detach().clone()
    if tensor.device not in _copy_streams:
        _copy_streams[tensor.device] = torch.cuda.Stream(tensor.device)
    stream = _copy_streams[tensor.device]
    stream.wait_stream(torch.cuda.current_stream(tensor.device))
    packed = torch.empty(tensor.shape, dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
    with torch.cuda.stream(stream):
        packed.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    tensor.record_stream(stream)
    return tensor.device, packed, done


def _from_cpu(packed: Any) -> torch.Tensor:
    """The saved block input back where it was: after its copy out finished, non-blocking on the
    current stream (the pinned buffer is kept by the host allocator until that copy is done)."""
    if isinstance(packed, torch.Tensor):
        return packed
    device, cpu, done = packed
    torch.cuda.current_stream(device).wait_event(done)
    return cpu.to(device, non_blocking=True)


def training_gpu() -> torch.device | None:
    """The GPU this process trains on (the local rank's), or None on CPU. The model may still be in CPU
    memory here (FSDP and DeepSpeed place it themselves), so it is not read from the weights."""
    from cptkit.model.load import local_device

    index = local_device()
    return None if index is None else torch.device("cuda", index)


def _compute_bytes(model: Any) -> int:
    """Bytes of the dtype the blocks compute in: the non-quantised weights' dtype (bf16 on a GPU, fp32 in
    the CPU tests), as autocast under the Trainer's bf16 leaves it."""
    for param in model.parameters():
        if param.dtype.is_floating_point and not param.requires_grad:
            return param.element_size()
    return next(iter(model.parameters())).element_size()

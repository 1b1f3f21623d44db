"""The fused kernels around the model's own modules: liger-kernel's RMSNorm, SwiGLU, RoPE and fused
linear cross-entropy, and regional torch.compile of the decoder blocks (`train.kernels`).

Each liger kernel is its own switch (auto: on where liger has it for the model type and the device is
a CUDA GPU, whose Triton kernels it needs; on: refused where it cannot apply), whether or not the fused
loss is on. liger applies them to the model instance, before peft wraps its linear layers, and to no
other model: the module-wide replacements it also makes (the norm and MLP classes) are put back, all
but RoPE's, which is the only way its rotary function reaches the attention. So RoPE is one switch per
architecture and process: the latest load decides for every model of that architecture.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from cptkit.errors import CptkitError

log = logging.getLogger(__name__)

LIGER_KERNELS = ("rms_norm", "swiglu", "rope")
# liger's own switches that each cptkit switch turns: the norm kernels (LayerNorm where a model has
# one), the gated MLP kernels (Gemma's GeGLU, Nemotron's squared ReLU), the rotary embedding
_LIGER_SWITCHES = {
    "rms_norm": ("rms_norm", "layer_norm"),
    "swiglu": ("swiglu", "geglu", "relu_squared"),
    "rope": ("rope",),
}
# transformers' own module-level objects that liger replaced, saved the first time: RoPE off puts them back
_STOCK: dict[tuple[str, str], Any] = {}

COMPILE_BACKEND_ENV = "CPTKIT_COMPILE_BACKEND"  # torch.compile backend for the blocks (default inductor)
# compiled versions of the block kept: training makes up to four (the first block apart, the first
# shape change), held-out evaluation without gradients as many again; past it new shapes run eagerly
RECOMPILE_LIMIT = 16


@dataclass(frozen=True)
class LigerSupport:
    """Which of LIGER_KERNELS liger-kernel has for a model type, and why it cannot be used at all here
    (`unusable`, None where it can)."""

    kernels: frozenset[str]
    unusable: str | None = None


def liger_support(model_type: str, on_gpu: bool | None = None) -> LigerSupport:
    """What liger-kernel offers `model_type` on this machine (`on_gpu`: default, whether CUDA is here),
    read from the parameters of its apply function for that type."""
    if not (torch.cuda.is_available() if on_gpu is None else on_gpu):
        return LigerSupport(frozenset(), "liger-kernel's Triton kernels need a CUDA GPU")
    apply_fn = _liger_apply_fn(model_type)
    if isinstance(apply_fn, str):
        return LigerSupport(frozenset(), apply_fn)
    if apply_fn is None:
        return LigerSupport(frozenset())
    params = inspect.signature(apply_fn).parameters
    return LigerSupport(frozenset(k for k in LIGER_KERNELS if any(s in params for s in _LIGER_SWITCHES[k])))


def _liger_apply_fn(model_type: str) -> Any:
    """liger's apply function for `model_type`, None where it has none, or why liger cannot be imported."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or triton missing or broken
        return f'liger-kernel cannot be used here ({e}; pip install "cptkit[gpu]")'
    return MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)


def choose_liger_kernels(
    kernels_cfg: Any, model_type: str, support: LigerSupport, where: str = "train.kernels"
) -> dict[str, bool]:
    """Each of LIGER_KERNELS on or off as `kernels_cfg` (a KernelsConfig) asks, given what liger offers;
    one CptkitError naming every kernel asked `on` that cannot apply."""
    chosen, refused = {}, []
    for name in LIGER_KERNELS:
        wanted = getattr(kernels_cfg, name)
        available = support.unusable is None and name in support.kernels
        if wanted == "on" and not available:
            why = support.unusable or f"liger-kernel has no {name} kernel for model type {model_type}"
            refused.append(f"{where}.{name}: on, but {why}")
        chosen[name] = wanted != "off" and available
    if refused:
        raise CptkitError("; ".join(refused) + "; use auto or off")
    return chosen


def check_kernels(train_cfg: Any, model_cfg: Any, section: str = "train") -> None:
    """Before the weights load: every liger kernel asked `on` applies to this model on this machine
    (reads the model's config only when one is asked `on`)."""
    if all(getattr(train_cfg.kernels, name) != "on" for name in LIGER_KERNELS):
        return
    from cptkit.model.load import load_model_config

    model_type = load_model_config(model_cfg).model_type
    choose_liger_kernels(train_cfg.kernels, model_type, liger_support(model_type), f"{section}.kernels")


def apply_liger(
    model: Any, train_cfg: Any, fused_cross_entropy: bool, record: dict[str, bool] | None = None
) -> bool:
    """Liger's kernels on this model instance as `train.kernels` and `fused_cross_entropy` ask;
    returns whether the fused linear cross-entropy is on. `record`, when given, gets whether each of
    LIGER_KERNELS was applied (for run_meta.json)."""
    model_type = model.config.model_type
    chosen = choose_liger_kernels(train_cfg.kernels, model_type, liger_support(model_type))
    apply_fn = _liger_apply_fn(model_type) if fused_cross_entropy or any(chosen.values()) else None
    if fused_cross_entropy and not callable(apply_fn):
        log.warning("liger-kernel has no kernels for model type %s; using the stock loss", model_type)
        fused_cross_entropy = False
    if callable(apply_fn):
        switches = {s: chosen[k] for k, names in _LIGER_SWITCHES.items() for s in names}
        switches.update(fused_linear_cross_entropy=fused_cross_entropy, cross_entropy=False)
        params = inspect.signature(apply_fn).parameters
        with _kept_to_the_instance(model, rope=chosen["rope"]):
            apply_fn(model=model, **{k: v for k, v in switches.items() if k in params})
        if chosen["rope"] and not _rope_swapped(model):  # liger declined it (DeepSeek's interleaved RoPE)
            if train_cfg.kernels.rope == "on":
                raise CptkitError(f"train.kernels.rope: on, but liger-kernel skips RoPE for {model_type}")
            chosen["rope"] = False
    else:
        _restore_stock_rope(_modeling_modules(model))
    if record is not None:
        record.update(chosen)
    log.info("liger kernels: %s", ", ".join(f"{k} {'on' if v else 'off'}" for k, v in chosen.items()))
    return fused_cross_entropy


def _modeling_modules(model: Any) -> list[Any]:
    """transformers' modeling modules of `model`'s classes (where liger replaces functions and classes)."""
    names = {type(m).__module__ for m in model.modules()}
    return [sys.modules[n] for n in sorted(names) if n.startswith("transformers.models.")]


def _is_rotary(name: str) -> bool:
    return "rotary" in name


@contextmanager
def _kept_to_the_instance(model: Any, rope: bool) -> Iterator[None]:
    """Undo the module-wide replacements liger makes while it patches `model`, all but the rotary
    function's when `rope`; RoPE off puts transformers' own rotary function back."""
    modules = _modeling_modules(model)
    before = {module: dict(vars(module)) for module in modules}
    yield
    for module, names in before.items():
        for name, old in names.items():
            if vars(module).get(name) is not old:
                _STOCK.setdefault((module.__name__, name), old)
                if not (rope and _is_rotary(name)):
                    setattr(module, name, old)
    if not rope:
        _restore_stock_rope(modules)


def _rope_swapped(model: Any) -> bool:
    """Whether a rotary function of `model`'s modeling modules is liger's now."""
    modules = {module.__name__: module for module in _modeling_modules(model)}
    return any(
        _is_rotary(name) and owner in modules and vars(modules[owner]).get(name) is not stock
        for (owner, name), stock in _STOCK.items()
    )


def _restore_stock_rope(modules: list[Any]) -> None:
    """transformers' own rotary functions back in `modules`, where an earlier load put liger's."""
    for module in modules:
        for (name_of_module, name), stock in _STOCK.items():
            if name_of_module == module.__name__ and _is_rotary(name):
                setattr(module, name, stock)


def compile_pays(mode: str, device: str) -> bool:
    """Whether `compile: auto` compiles the blocks for `mode` (full, lora, qlora) on `device` (cuda,
    cpu): where bench/ measured regional compilation to pay. Not measured yet: nowhere."""
    return False


def decoder_blocks(model: Any) -> list[torch.nn.Module]:
    """The repeated decoder blocks of a transformers model (under peft too), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def blocks_compiled(model: Any) -> bool:
    """Whether the decoder blocks of `model` run compiled (`compile_blocks`)."""
    blocks = decoder_blocks(model)
    return bool(blocks) and all(block._compiled_call_impl is not None for block in blocks)


def compile_blocks(model: Any, train_cfg: Any) -> bool:
    """Regional torch.compile of each decoder block as `train.kernels.compile` asks; returns whether
    the blocks were compiled.

    Each block is compiled in place (`Module.compile`: the state dict keeps its names); the blocks
    share one code object and dynamo guards on their parameters as inputs, not on the block, so one
    graph serves them all (the first block has its own where its input needs no gradient: frozen
    embeddings without checkpointing). Called last, after peft and the memory plan: a checkpointed
    block is recomputed through its compiled graph. The first shape change (the last, shorter batch;
    the varlen kernel's longest document) recompiles once with dynamic sizes; past RECOMPILE_LIMIT
    versions dynamo runs the block eagerly for new shapes, with a warning, and the run goes on slower.
    `CPTKIT_COMPILE_BACKEND` names another torch.compile backend (aot_eager: no code generation)."""
    setting = train_cfg.kernels.compile
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "off" or (setting == "auto" and not compile_pays(train_cfg.mode, device)):
        return False
    blocks = decoder_blocks(model)
    if not blocks:
        raise CptkitError(
            f"train.kernels.compile: on, but {type(model).__name__} has no decoder blocks that cptkit knows "
            "(transformers' GradientCheckpointingLayer); use auto or off"
        )
    backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    for block in blocks:
        block.compile(backend=backend)
    log.info("torch.compile (%s): %d decoder blocks of %s", backend, len(blocks), type(blocks[0]).__name__)
    return True

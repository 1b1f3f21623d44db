"""cptkit's fused LoRA path (`train.kernels.fast_lora`): the base matmul and the low-rank update from
one read of the input, with a hand-written backward that keeps no copy of it.

peft's LoRA layer computes `base(x) + lora_B(lora_A(dropout(x))) * s`. With its fp32 adapter weights and
bf16 activations that costs, per adapted linear: a fp32 copy of x (`_cast_input_dtype`), a bf16 copy of
that copy (autocast, in front of lora_A, kept for backward), and two output-sized temporaries for the
scaled update and the sum (the 4-bit layer clones the base output as well). The fused path computes
`y = x W^T (+ b) + s (x A^T) B^T` in one autograd Function in the compute dtype: the low-rank part is
accumulated into the base output in place, and backward keeps only x itself (the caller's tensor, shared
by q/k/v or gate/up) and the rank-sized `x A^T`. A 4-bit weight is dequantised in forward and again in
backward, as bitsandbytes does, and never kept.

Routing is per call: whenever the layer is not plain single-adapter LoRA (adapters disabled, merged,
several active, DoRA and other variants, lora_bias, dropout, extra arguments, hooks on the modules
it would skip)
peft's own forward runs, so `disable_adapter()`, merging and saving behave exactly as peft's.
"""

from __future__ import annotations

import logging
import types
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cptkit.errors import CptkitError

log = logging.getLogger(__name__)

ROUTED = "_cptkit_fast_lora"  # set on a LoRA layer whose forward is the fused one
STOCK_FORWARD = "_cptkit_stock_forward"  # the forward it replaced, which the fused one falls back to


@dataclass(frozen=True)
class Route:
    """What the fused Function reads from one LoRA layer: the base weight (dense, or packed 4-bit with its
    quantisation state), its bias, the active adapter's A and B and its scaling."""

    weight: torch.Tensor
    quant_state: Any
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's where it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def dense_weight(weight: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The base weight (out, in) in `dtype`: a 4-bit one dequantised (a temporary, never kept)."""
    if quant_state is None:
        return weight.to(dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight, quant_state).to(dtype)


def _is_4bit(base: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(base, bnb.nn.Linear4bit)


def hooked(module: nn.Module) -> bool:
    """Whether `module` has hooks (DeepSpeed ZeRO-3 gathering, accelerate offload, cptkit's EWC Fisher):
    they run only through module.__call__, which the fused path skips for the modules it computes."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or hasattr(module, "_hf_hook")
    )


def layer_problem(layer: nn.Module) -> str | None:
    """Why this peft LoRA layer cannot take the fused path at all (its structure), or None."""
    base = getattr(layer, "base_layer", None)
    if base is None or not hasattr(layer, "lora_A"):
        return "not a LoRA linear layer"
    if type(base) is not nn.Linear and not _is_4bit(base):
        return f"base layer {type(base).__name__} (the fused path takes nn.Linear and 4-bit Linear4bit)"
    if any(not isinstance(d, nn.Identity) for d in layer.lora_dropout.values()):
        return "LoRA dropout above 0"
    if layer.lora_variant or any(layer.lora_bias.values()):
        return "a LoRA variant (DoRA, ...) or lora_bias"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "the base weight trains"
    if hooked(base):
        return "hooks on the base layer"
    return None


def route(layer: nn.Module) -> Route | None:
    """The active adapter of `layer` as the fused path reads it, or None where peft's forward must run
    (checked at every call: adapters can be disabled, merged, switched or added after loading)."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.lora_bias.get(name):
        return None
    if not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    base = layer.base_layer
    quant_state = None
    if type(base) is not nn.Linear:
        quant_state = getattr(base.weight, "quant_state", None)
        if not _is_4bit(base) or quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):
            return None
    elif base.weight.shape != (layer.out_features, layer.in_features):  # e.g. a ZeRO-3 placeholder
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if base.weight.requires_grad or hooked(base) or hooked(lora_a) or hooked(lora_b):
        return None
    return Route(
        weight=base.weight,
        quant_state=quant_state,
        bias=base.bias,
        lora_a=lora_a.weight,
        lora_b=lora_b.weight,
        scaling=float(layer.scaling[name]),
    )


def base_plus_lowrank(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    s: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x2 W^T (+ bias) + s (x2 A^T) B^T` for 2-D x2 and a dense W, all in x2's dtype, the update
    accumulated into the base output in place; returns the output and `x2 A^T` (what backward needs)."""
    dtype = x2.dtype
    out = torch.addmm(bias.to(dtype), x2, weight.t()) if bias is not None else x2 @ weight.t()
    xa = x2 @ a.to(dtype).t()
    out.addmm_(xa, b.to(dtype).t(), alpha=s)
    return out, xa


@dataclass
class LowRankBackward:
    """What the backward of `x W^T + s (x A^T) B^T` needs besides the saved tensors: the frozen base
    weight (kept by reference: a parameter, not an activation), its 4-bit state, s, and which of x, A, B
    want a gradient."""

    weight: torch.Tensor
    quant_state: Any
    scaling: float
    needs: tuple[bool, bool, bool]

    def grads(self, g: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        """(grad_x, grad_A, grad_B) for 2-D g and x2: grad_x = g W + s (g B) A as one matmul and one addmm,
        grad_A = s (g B)^T x, grad_B = s g^T (x A^T); the adapter's in its parameters' dtype (fp32 under
        peft), for their optimizer."""
        dtype = g.dtype
        gb = (g @ b.to(dtype)).mul_(self.scaling)
        grad_x = grad_a = grad_b = None
        if self.needs[0]:
            grad_x = g @ dense_weight(self.weight, self.quant_state, dtype)
            grad_x.addmm_(gb, a.to(dtype))
        if self.needs[1]:
            grad_a = (gb.t() @ x2).to(a.dtype)
        if self.needs[2]:
            grad_b = (g.t() @ xa).mul_(self.scaling).to(b.dtype)
        return grad_x, grad_a, grad_b


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T (+ bias) + s (x A^T) B^T, saving x (the caller's tensor) and x A^T only.

    x arrives in the compute dtype (the caller casts it, as autocast would); every operand is cast to x's
    dtype here, so forward and backward compute the same whether or not autocast is on."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, quant_state):
        x2 = x.reshape(-1, x.shape[-1])
        dense = dense_weight(weight, quant_state, x.dtype)
        out, xa = base_plus_lowrank(x2, dense, bias, lora_a, lora_b, scaling)
        needs = ctx.needs_input_grad
        ctx.backward_state = LowRankBackward(weight, quant_state, scaling, (needs[0], needs[3], needs[4]))
        ctx.save_for_backward(x, lora_a, lora_b, xa)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_a, lora_b, xa = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x, grad_a, grad_b = ctx.backward_state.grads(g, x.reshape(-1, x.shape[-1]), xa, lora_a, lora_b)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, grad_a, grad_b, None, None


def fused_linear(x: torch.Tensor, r: Route) -> torch.Tensor:
    """The fused LoRA linear on x, cast to the compute dtype first (a no-op for bf16 activations under
    bf16 autocast: no copy of x is made)."""
    x = x.to(compute_dtype(x))
    return LoraLinearFunction.apply(x, r.weight, r.bias, r.lora_a, r.lora_b, r.scaling, r.quant_state)


def _fast_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The LoRA layer's forward on the fused path where it applies, else peft's."""
    found = None if args or kwargs or not torch.is_floating_point(x) else route(self)
    if found is None:
        return getattr(self, STOCK_FORWARD)(x, *args, **kwargs)
    return fused_linear(x, found)


def _autocast_cast_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's forward (the dropout path) without its fp32 copy of x under autocast, which then casts x
    once for lora_A itself; without autocast peft casts x to the adapter's dtype as before."""
    self.cast_input_dtype_enabled = not torch.is_autocast_enabled(x.device.type)
    return getattr(self, STOCK_FORWARD)(x, *args, **kwargs)


def patch_forward(module: nn.Module, forward: Any, marker: str | None = None) -> None:
    """Replace this instance's forward, keeping the one it had (the class's, or liger's) to fall back to;
    the module tree and state_dict keys stay peft's."""
    if STOCK_FORWARD not in module.__dict__:
        setattr(module, STOCK_FORWARD, module.forward)
    module.forward = types.MethodType(forward, module)
    if marker:
        setattr(module, marker, True)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """peft's LoRA layers (linear or not) of `model`, by name."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def wanted(train_cfg: Any) -> bool:
    """Whether `train.kernels.fast_lora` asks for the fused path; refuses `on` where it cannot apply."""
    setting, mode, dropout = train_cfg.kernels.fast_lora, train_cfg.mode, train_cfg.lora.dropout
    if setting == "off":
        return False
    if mode not in ("lora", "qlora") or dropout > 0:
        if setting == "on":
            raise CptkitError(
                f"train.kernels.fast_lora: on needs mode lora or qlora and lora.dropout 0 (mode {mode}, "
                f"dropout {dropout}): set lora.dropout: 0, or train.kernels.fast_lora: auto (peft's path)"
            )
        return False
    return True


def enable_fast_lora(model: Any, train_cfg: Any) -> int:
    """Route the peft LoRA layers of `model` through the fused path where it applies; returns how many
    layers were routed. Also fuses Llama-style MLPs whose three projections are routed (see
    `cptkit.model.fast_lora_mlp`), and, on the dropout path, stops peft's fp32 copy of x under autocast."""
    if train_cfg.mode not in ("lora", "qlora") or train_cfg.kernels.fast_lora == "off":
        return 0
    layers = lora_layers(model)
    if not wanted(train_cfg):  # dropout above 0: peft's path, without its round trip through fp32
        for _, layer in layers:
            if hasattr(layer, "cast_input_dtype_enabled"):
                patch_forward(layer, _autocast_cast_forward)
        return 0
    skipped: Counter[str] = Counter()
    for _, layer in layers:
        problem = layer_problem(layer)
        if problem is None:
            patch_forward(layer, _fast_forward, ROUTED)
        else:
            skipped[problem] += 1
    if skipped and train_cfg.kernels.fast_lora == "on":
        reasons = "; ".join(f"{n} with {why}" for why, n in skipped.items())
        raise CptkitError(
            f"train.kernels.fast_lora: on, but {sum(skipped.values())} LoRA layers cannot take the fused "
            f"path ({reasons}): set train.kernels.fast_lora: auto to use peft's path for those"
        )
    from cptkit.model.fast_lora_mlp import fuse_mlps

    fuse_mlps(model)
    status = fast_lora_status(model)
    log.info(
        "fused LoRA path: %d of %d LoRA layers, %d MLPs fused%s",
        status["layers"],
        len(layers),
        status["mlps"],
        "".join(f"; {n} on peft's path: {why}" for why, n in skipped.items()),
    )
    return status["layers"]


def fast_lora_status(model: nn.Module) -> dict[str, int]:
    """How many LoRA layers take the fused path and how many MLPs are fused (for logs and run_meta)."""
    from cptkit.model.fast_lora_mlp import FUSED

    modules = list(model.modules())
    return {
        "layers": sum(1 for m in modules if getattr(m, ROUTED, False)),
        "mlps": sum(1 for m in modules if getattr(m, FUSED, False)),
    }

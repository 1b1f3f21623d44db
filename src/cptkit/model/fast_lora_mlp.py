"""The fused LoRA MLP: `down(silu(gate(x)) * up(x))` for Llama-style MLPs whose three projections take
the fused LoRA path (`cptkit.model.fast_lora`).

gate and up run as fused LoRA linears; the down projection and the SwiGLU in front of it are ONE autograd
Function that saves gate and up (which backward needs anyway) and recomputes `silu(gate) * up` in
backward. The stock module also keeps silu(gate) and the product (f elements per token each, per block),
and peft a copy of the product in front of down's lora_A; the memory plan counts on their absence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cptkit.model import fast_lora
from cptkit.model.fast_lora import LowRankBackward, base_plus_lowrank, dense_weight

FUSED = "_cptkit_fused_mlp"  # set on an MLP whose forward is the fused one

# MLP classes computing down(silu(gate(x)) * up(x)); liger's swaps in LigerSwiGLUMLP's forward, or the class
SWIGLU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "LigerSwiGLUMLP"})
SILU = frozenset({"SiLU", "SiLUActivation"})  # torch's and transformers' (ACT2FN["silu"])
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A Llama-style MLP: gate, up and down projections and a SiLU between (liger's MLP has no act_fn)."""
    if type(module).__name__ not in SWIGLU_MLPS or not all(hasattr(module, p) for p in PROJECTIONS):
        return False
    act = getattr(module, "act_fn", None)
    return act is None or type(act).__name__ in SILU


class SwiGLUDownFunction(torch.autograd.Function):
    """down(silu(gate) * up) with down a LoRA linear, saving gate, up and (silu(gate) * up) A^T only."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling, quant_state):
        h = F.silu(gate).mul_(up)
        h2 = h.reshape(-1, h.shape[-1])
        dense = dense_weight(weight, quant_state, h.dtype)
        out, ha = base_plus_lowrank(h2, dense, bias, lora_a, lora_b, scaling)
        needs = ctx.needs_input_grad
        ctx.backward_state = LowRankBackward(
            weight, quant_state, scaling, (any(needs[:2]), needs[4], needs[5])
        )
        ctx.save_for_backward(gate, up, lora_a, lora_b, ha)
        return out.view(*h.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, lora_a, lora_b, ha = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        # recomputed in 2 elementwise passes; the gradients take 3 (silu_backward is one kernel)
        silu = F.silu(gate)
        h2 = (silu * up).reshape(-1, gate.shape[-1])
        grad_h, grad_a, grad_b = ctx.backward_state.grads(g, h2, ha, lora_a, lora_b)
        del h2
        grad_gate = grad_up = None
        if grad_h is not None:
            grad_h = grad_h.view(gate.shape)
            grad_up = grad_h * silu
            del silu
            grad_gate = torch.ops.aten.silu_backward(grad_h.mul_(up), gate)
        return grad_gate, grad_up, None, None, grad_a, grad_b, None, None


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The MLP on the fused path where all three projections take it at this call, else its own forward."""
    projections = [getattr(self, p) for p in PROJECTIONS]
    skip = args or kwargs or any(fast_lora.hooked(p) for p in projections)  # their hooks must run
    routes = None if skip else [fast_lora.route(p) for p in projections]
    if routes is None or None in routes:
        return getattr(self, fast_lora.STOCK_FORWARD)(x, *args, **kwargs)
    gate_route, up_route, down = routes
    x = x.to(fast_lora.compute_dtype(x))
    gate, up = fast_lora.fused_linear(x, gate_route), fast_lora.fused_linear(x, up_route)
    return SwiGLUDownFunction.apply(
        gate, up, down.weight, down.bias, down.lora_a, down.lora_b, down.scaling, down.quant_state
    )


def fuse_mlps(model: nn.Module) -> int:
    """Fuse every Llama-style MLP of `model` whose three projections are on the fused LoRA path; returns
    how many were fused."""
    count = 0
    for module in model.modules():
        if is_swiglu_mlp(module) and all(
            getattr(getattr(module, p), fast_lora.ROUTED, False) for p in PROJECTIONS
        ):
            fast_lora.patch_forward(module, _fused_mlp_forward, FUSED)
            count += 1
    return count

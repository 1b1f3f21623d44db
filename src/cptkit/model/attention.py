"""Attention that stays inside each packed document, through the fastest kernel available.

Packed rows carry position_ids that restart at 0 at every document and no attention_mask. Each
choice below turns that into document isolation:

- `varlen`: `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA): the rows are flattened
  into one stream cut at every document start (cu_seqlens), the FlashAttention way. Registered with
  transformers as `cptkit_varlen`; no mask tensor is ever built.
- `sdpa`, `eager`, `flex`: transformers' own kernels. Its masking code sees position_ids that restart
  without an attention_mask and builds a block-diagonal causal mask (`find_packed_sequence_indices`).
- `flash_attention_2`: the flash-attn package, which reads the same position_ids.

`auto` picks varlen on a CUDA device that has it, else sdpa. The choice is logged and recorded.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

VARLEN = "cptkit_varlen"
_registered = False


def varlen_available() -> bool:
    """True when torch has `varlen_attn` and a CUDA device to run it on."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def choose_attention(requested: str, on_gpu: bool) -> str:
    """The transformers attn_implementation for a `model.attention` choice."""
    if requested == "auto":
        return VARLEN if on_gpu and varlen_available() else "sdpa"
    if requested == "varlen":
        if not varlen_available():
            from cptkit.errors import CptkitError

            raise CptkitError(
                "model.attention: varlen needs torch >= 2.10 with CUDA (torch.nn.attention.varlen); "
                "use auto, sdpa or flex"
            )
        return VARLEN
    if requested == "flex":
        return "flex_attention"
    return requested


def describe(implementation: str) -> str:
    """A short human name for run_meta and logs."""
    return {VARLEN: "varlen (torch varlen_attn)", "flex_attention": "flex"}.get(
        implementation, implementation
    )


class _SeqLens:
    """cu_seqlens for one batch, computed once and reused by every layer (they share position_ids)."""

    def __init__(self):
        self.key: torch.Tensor | None = None
        self.value: tuple[torch.Tensor, int] | None = None

    def get(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.key is not position_ids or self.value is None:
            flat = position_ids.reshape(-1)
            starts = torch.nonzero(flat == 0).flatten()
            if starts.numel() == 0 or int(starts[0]) != 0:  # a row that does not start a document
                starts = torch.cat([starts.new_zeros(1), starts])
            # every row begins a new sequence even if its position_ids do not start at 0
            width = position_ids.shape[-1]
            row_starts = torch.arange(0, flat.numel(), width, device=flat.device)
            starts = torch.unique(torch.cat([starts, row_starts]))
            ends = torch.cat([starts, starts.new_tensor([flat.numel()])])
            cu = ends.to(torch.int32)
            max_len = int((ends[1:] - ends[:-1]).max())
            self.key, self.value = position_ids, (cu, max_len)
        return self.value


_seqlens = _SeqLens()


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (B, H, S, D) in, (B, S, H, D) out, causal within each document."""
    from torch.nn.attention.varlen import varlen_attn

    position_ids = kwargs.get("position_ids")
    batch, heads, seq, dim = query.shape
    if position_ids is None or query.shape[2] != key.shape[2]:
        # no packing information (or generation with a cache): plain causal attention
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    cu, max_len = _seqlens.get(position_ids)
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], dim)
    if key.shape[1] != heads and not _accepts_gqa():  # older torch: repeat the shared key/value heads
        k = k.repeat_interleave(heads // key.shape[1], dim=1)
        v = v.repeat_interleave(heads // value.shape[1], dim=1)
    extra = {"enable_gqa": True} if key.shape[1] != heads and _accepts_gqa() else {}
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0), **extra)
    return out.reshape(batch, seq, heads, dim), None


def _accepts_gqa() -> bool:
    import inspect
    from functools import cache

    @cache
    def check() -> bool:
        from torch.nn.attention.varlen import varlen_attn

        return "enable_gqa" in inspect.signature(varlen_attn).parameters

    return check()


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The varlen kernel needs no mask tensor: cu_seqlens carry the document boundaries."""
    return None


def register() -> None:
    """Make `cptkit_varlen` known to transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _no_mask)
    _registered = True

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

import inspect
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

VARLEN = "cptkit_varlen"
_registered = False
# whether this torch's varlen_attn shares key/value heads itself (asked once here, not in every layer,
# where torch.compile would trace the signature lookup)
_ACCEPTS_GQA = varlen_attn is not None and "enable_gqa" in inspect.signature(varlen_attn).parameters


def varlen_available() -> bool:
    """True when torch has `varlen_attn` and a CUDA device to run it on."""
    return varlen_attn is not None and torch.cuda.is_available()


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


# Batch keys the collator adds for the varlen kernel (transformers' FlashAttentionKwargs names, which
# the model passes through to the attention function): the document boundaries over the flattened
# batch and the longest document, computed once per batch on the CPU.
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def document_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32, over the flattened rows) and the longest document of packed position_ids
    (rows, width): a document starts at every position id 0 and at every row start, whatever its
    position id there; padding continues the row's last document. On a GPU tensor this syncs."""
    rows, width = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    index = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([index, index.new_tensor([rows * width])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_metadata(position_ids: torch.Tensor) -> dict[str, Any]:
    """The VARLEN_KEYS of one batch from its position_ids (the collator calls this on the CPU)."""
    cu, longest = document_boundaries(position_ids)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


class _SeqLens:
    """cu_seqlens for a batch whose collator gave none (eval, generation without a cache), derived once
    and reused by every layer: they share position_ids, or views of the same ones (an expanded
    position_ids is a new tensor object per layer, with the same memory, shape and version)."""

    def __init__(self):
        self.key: torch.Tensor | None = None
        self.version = -1  # the key's in-place version when it was cached (views share the counter)
        self.value: tuple[torch.Tensor, int] | None = None

    def get(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.value is None or not self._holds(position_ids):
            # the cache holds its key, so no other tensor can take its memory while it is cached
            self.key, self.version = position_ids, _version(position_ids)
            self.value = document_boundaries(position_ids)
        return self.value

    def _holds(self, position_ids: torch.Tensor) -> bool:
        """Whether position_ids is the cached key or a view of the same memory, unchanged since."""
        key = self.key
        return (
            key is not None
            and _version(position_ids) == self.version
            and (
                key is position_ids
                or (
                    key.device == position_ids.device
                    and key.data_ptr() == position_ids.data_ptr()
                    and key.shape == position_ids.shape
                    and key.stride() == position_ids.stride()
                )
            )
        )


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version; inference tensors (torch.inference_mode) have no counter."""
    return -1 if torch.is_inference(tensor) else tensor._version


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
    """transformers attention function: (B, H, S, D) in, (B, S, H, D) out, causal within each document.

    The document boundaries come from the batch (`VARLEN_KEYS`, set by the collator: no host sync, one
    graph under torch.compile), else from position_ids, derived once per batch (a sync)."""
    position_ids = kwargs.get("position_ids")
    given = kwargs.get("cu_seq_lens_q") is not None
    batch, heads, seq, dim = query.shape
    if (position_ids is None and not given) or query.shape[2] != key.shape[2]:
        # no packing information (or generation with a cache): plain causal attention
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        kwargs = {k: v for k, v in kwargs.items() if k not in VARLEN_KEYS}
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if given:
        cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
        max_q, max_k = kwargs["max_length_q"], kwargs["max_length_k"]
    else:
        if position_ids.shape[0] != batch:
            position_ids = position_ids.expand(batch, -1)
        cu_q, max_q = _seqlens.get(position_ids)
        cu_k, max_k = cu_q, max_q
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], dim)
    if key.shape[1] != heads and not _ACCEPTS_GQA:  # older torch: repeat the shared key/value heads
        k = k.repeat_interleave(heads // key.shape[1], dim=1)
        v = v.repeat_interleave(heads // value.shape[1], dim=1)
    extra = {"enable_gqa": True} if key.shape[1] != heads and _ACCEPTS_GQA else {}
    out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, window_size=(-1, 0), **extra)
    return out.reshape(batch, seq, heads, dim), None


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

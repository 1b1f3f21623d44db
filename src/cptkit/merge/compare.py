"""Which merge of a QLoRA adapter is closer to the adapter as trained (on the 4-bit base)?

The reference is the adapter, unmerged, on the NF4 round trip of the base (what bitsandbytes computes
in training). Each merged candidate is loaded like any user would load it (plain transformers) and
compared with the reference on the same held-out tokens: mean KL(reference || candidate) per token,
the largest absolute logit difference, and both held-out losses.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cptkit.eval.models import load_model
from cptkit.eval.perplexity import iter_scored
from cptkit.merge.scale import adapter_at_scale

if TYPE_CHECKING:
    from cptkit.data.prepared import Prepared

log = logging.getLogger(__name__)


def heldout_token_docs(prepared: Prepared, documents_per_set: int, max_tokens: int) -> list[list[int]]:
    """A few held-out documents of each set (as token ids), cut so that all together hold about max_tokens."""
    docs: list[list[int]] = []
    for name in prepared.heldout:
        ds = prepared.heldout_set(name)
        docs += [list(r) for r in ds.select(range(min(documents_per_set, len(ds))))["input_ids"]]
    if not docs:
        return []
    cap = max(16, max_tokens // len(docs))
    return [d[:cap] for d in docs if len(d) >= 2]


@torch.no_grad()
def compare_candidates(
    base: str | Path,
    adapter: str | Path,
    candidates: dict[str, Path],
    docs: list[list[int]],
    quant: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    seq_length: int = 2048,
    batch_size: int = 4,
    trust_remote_code: bool = False,
    scale: float = 1.0,
) -> dict[str, Any]:
    """Reference loss and, per candidate, KL / max logit difference / loss against the reference (the
    adapter at merge.scale `scale`, as the candidates merged it)."""
    reference = load_model(
        base, device, dtype, adapter=adapter, nf4=quant, trust_remote_code=trust_remote_code
    )
    ref: list[tuple[torch.Tensor, torch.Tensor]] = []
    ref_nats = 0.0
    with adapter_at_scale(reference, scale):
        for logits, targets, _ in iter_scored(reference, docs, seq_length, batch_size, 0, desc="reference"):
            ref_nats += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            ref.append((logits.cpu(), targets.cpu()))
    tokens = sum(t.numel() for _, t in ref)
    del reference  # one model in memory at a time
    _release()
    results = {
        "reference": {
            "what": "adapter unmerged on the NF4 round trip of the base"
            + (f", its update times merge.scale {scale:g}" if scale != 1 else ""),
            "loss": ref_nats / tokens,
            "tokens": tokens,
            "documents": len(docs),
        },
        "candidates": {},
    }
    for name, folder in candidates.items():
        model = load_model(folder, device, dtype, trust_remote_code=trust_remote_code)
        kl_sum, max_diff, nats = 0.0, 0.0, 0.0
        for (logits, targets, _), (r_logits, _) in zip(
            iter_scored(model, docs, seq_length, batch_size, 0, desc=name), ref, strict=True
        ):
            r_logits = r_logits.to(logits.device)
            r_logp, logp = r_logits.log_softmax(-1), logits.log_softmax(-1)
            kl_sum += float((r_logp.exp() * (r_logp - logp)).sum())
            max_diff = max(max_diff, float((logits - r_logits).abs().max()))
            nats += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        results["candidates"][name] = {
            "mean_kl": kl_sum / tokens,
            "max_abs_logit_diff": max_diff,
            "loss": nats / tokens,
            "loss_diff": (nats - ref_nats) / tokens,
        }
        log.info(
            "%s vs adapter on the 4-bit base: mean KL %.3g, max |logit diff| %.3g, loss %.4f (reference %.4f)",
            name,
            kl_sum / tokens,
            max_diff,
            nats / tokens,
            ref_nats / tokens,
        )
        del model
        _release()
    return results


def _release() -> None:
    """Return the memory of a model just deleted before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

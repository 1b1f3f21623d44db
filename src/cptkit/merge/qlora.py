"""QLoRA adapters: which bases to merge into, and which merge to keep.

A QLoRA adapter learned to correct the NF4 base, not the original one. Merging it into the original
bf16 weights re-adds the quantisation error the adapter never saw; merging it into the dequantised NF4
weights keeps the model the adapter was trained as, but keeps the quantisation error in the weights.
Both are written, measured against the adapter on the 4-bit base, and the closer one is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from cptkit.merge.nf4 import nf4_available, nf4_settings
from cptkit.merge.stream import Variant

log = logging.getLogger(__name__)


def plan_variants(
    mode: str,
    quant: dict[str, Any],
    device: torch.device,
    folder,
    nf4_check: Callable[[torch.device], str | None] = nf4_available,
) -> tuple[list[Variant], list[str]]:
    """The merges to write, and notes for the report (why a variant was left out). `nf4_check(device)`
    says why the NF4 round trip cannot be computed on `device` (None when it can)."""
    if mode != "qlora":
        return [Variant("lora", folder)], []
    if int(quant.get("bits", 4)) != 4:
        return [Variant("bf16", folder / "bf16")], [
            f"{quant.get('bits')}-bit QLoRA: merged into the original base only"
        ]
    reason = nf4_check(device)
    if reason:
        log.warning("%s; merging into the original base only", reason)
        return [Variant("bf16", folder / "bf16")], [
            f"{reason}: merged into the original (bf16) base only, "
            "not compared with the 4-bit base the adapter was trained on"
        ]
    settings = nf4_settings(quant)
    return [Variant("bf16", folder / "bf16"), Variant("dequantized", folder / "dequantized", settings)], []


def choose_variant(
    variants: list[Variant], comparison: dict[str, Any] | None, asked: str
) -> tuple[Variant, str]:
    """The variant to keep and why: the one asked for, else the one closest to the adapter as trained."""
    by_name = {v.name: v for v in variants}
    if len(variants) == 1:
        return variants[0], "the only merge made"
    if asked != "auto":
        return by_name[asked], f"merge.qlora_base: {asked}"
    if comparison and comparison.get("candidates"):
        kl = {n: c["mean_kl"] for n, c in comparison["candidates"].items()}
        best = min(kl, key=kl.get)
        return by_name[best], f"lowest mean KL to the adapter on the 4-bit base ({best} {kl[best]:.3g})"
    return by_name["dequantized"], (
        "no held-out documents to compare on; kept the merge into the dequantised base, "
        "whose weights are the ones the adapter was trained against"
    )

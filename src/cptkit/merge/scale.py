"""What `merge.scale` (and each point of `eval.interpolate`) does to one weight: base + scale * (trained -
base), computed in float32. The ends are exact: scale 1 is the trained tensor itself, scale 0 the base's,
so a merge at scale 1 is the merge as trained, byte for byte."""

from __future__ import annotations

import torch


def interpolated(base: torch.Tensor, trained: torch.Tensor, scale: float) -> torch.Tensor:
    """base + scale * (trained - base); non-float tensors (integer buffers) are the trained ones."""
    if scale == 1 or not trained.is_floating_point():
        return trained
    if scale == 0:
        return base
    b = base.to(trained.device, torch.float32)
    return b + scale * (trained.to(torch.float32) - b)

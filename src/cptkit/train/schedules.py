"""Learning-rate schedules for continued pretraining: cosine, warmup-stable-decay, linear, constant.

Each is a multiplier of the peak learning rate as a function of the optimizer step, so it plugs into
`torch.optim.lr_scheduler.LambdaLR`, which the Trainer saves and restores with each checkpoint.
`rewarm_from_step` restarts the warmup at that step (extending a run that already decayed, or
continuing from a checkpoint with a new peak), and the remaining steps are scheduled from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from cptkit.config.train import ScheduleConfig


def warmup_steps(schedule: ScheduleConfig, total_steps: int) -> int:
    """Warmup below 1 is a fraction of the run, otherwise a number of steps."""
    if schedule.warmup < 1:
        return int(math.ceil(schedule.warmup * total_steps))
    return int(schedule.warmup)


def lr_multiplier(step: int, schedule: ScheduleConfig, total_steps: int) -> float:
    """The learning rate at `step` as a fraction of the peak."""
    start = schedule.rewarm_from_step or 0
    if step < start:  # before the re-warm step the original schedule applies
        start = 0
    step, total = step - start, max(total_steps - start, 1)
    warm = min(warmup_steps(schedule, total), total)
    floor = schedule.min_lr_ratio
    if step < warm:
        return (step + 1) / (warm + 1)
    if schedule.type == "constant":
        return 1.0
    if schedule.type == "wsd":
        decay_steps = int(math.ceil(schedule.decay * total))
        decay_start = max(total - decay_steps, warm)
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start) / max(total - decay_start, 1), 1.0)
        return floor + (1 - floor) * (1 - progress)
    progress = min((step - warm) / max(total - warm, 1), 1.0)
    if schedule.type == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `schedule` over `total_steps` optimizer steps."""
    fn: Callable[[int], float] = partial(lr_multiplier, schedule=schedule, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

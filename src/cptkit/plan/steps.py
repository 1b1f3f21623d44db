"""The optimizer steps a run takes and the tokens it sees, counted as transformers' Trainer counts them:
`max_steps` when set, else epochs x ceil(ceil(rows / (micro-batch x processes)) / accumulation)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cptkit.config.train import TrainingRun
from cptkit.plan.tokens import DataTokens
from cptkit.train.schedules import warmup_steps


@dataclass(frozen=True)
class StepPlan:
    """How long the run is: steps, rows and tokens per step, tokens in all, passes over the data."""

    optimizer_steps: int
    micro_batch: int
    accumulation: int
    world_size: int
    rows_per_step: int
    tokens_per_step: int  # real tokens (padding left out: rows are packing_efficiency full)
    total_tokens: int
    epochs: float  # passes over the training rows
    source_epochs: dict[str, float]  # passes over each source's own training tokens
    warmup_steps: int
    from_max_steps: bool

    def to_json(self) -> dict:
        return asdict(self)


def plan_steps(train: TrainingRun, data: DataTokens, world_size: int = 1) -> StepPlan:
    """The step plan of `train` over `data` on `world_size` processes."""
    from cptkit.train.arguments import hf_settings

    hf = hf_settings(train, on_gpu=False, dtype=None)
    micro, accumulation = int(hf["per_device_train_batch_size"]), int(hf["gradient_accumulation_steps"])
    rows_per_step = micro * accumulation * world_size
    max_steps = int(hf.get("max_steps", -1) or -1)
    if max_steps > 0:
        steps, rows_seen = max_steps, max_steps * rows_per_step
    else:
        batches = math.ceil(data.rows / (micro * world_size))
        steps = math.ceil(float(hf["num_train_epochs"]) * max(math.ceil(batches / accumulation), 1))
        rows_seen = float(hf["num_train_epochs"]) * data.rows
    epochs = rows_seen / data.rows if data.rows else 0.0
    tokens_per_row = data.seq_length * data.packing_efficiency
    return StepPlan(
        optimizer_steps=steps,
        micro_batch=micro,
        accumulation=accumulation,
        world_size=world_size,
        rows_per_step=rows_per_step,
        tokens_per_step=round(rows_per_step * tokens_per_row),
        total_tokens=round(epochs * data.trained_tokens),
        epochs=epochs,
        source_epochs={n: epochs * s.sampling_factor for n, s in data.sources.items() if s.train_tokens},
        warmup_steps=warmup_steps(train.schedule, steps),
        from_max_steps=max_steps > 0,
    )

"""Predicted tokens/s and wall time of a run on a GPU: the MFU of the closest measured row of the
calibration table, times the GPU's peak, over the run's FLOPs per token (`cptkit.model.flops`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cptkit.config.train import TrainingRun
from cptkit.model.flops import flops_per_token_of_shape
from cptkit.model.shape import ModelShape
from cptkit.plan.calibration import Calibration, CalibrationRow
from cptkit.plan.gpus import Gpu
from cptkit.train.memory import MemoryPlan


@dataclass(frozen=True)
class SpeedPrediction:
    """tokens/s (all processes) and hours for the run, and how they were worked out."""

    tokens_per_second: float | None
    hours: float | None
    mfu: float | None
    row: CalibrationRow | None
    how: str

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens_per_second": self.tokens_per_second,
            "hours": self.hours,
            "mfu": self.mfu,
            "row": self.row.variant if self.row else None,
            "how": self.how,
        }


def run_flops_per_token(train: TrainingRun, shape: ModelShape, seq_length: int) -> float:
    """Training FLOPs per token of `train` on a model of `shape` (`cptkit.model.flops`)."""
    lora = train.lora
    return flops_per_token_of_shape(
        shape, seq_length, train.mode, lora.r, lora.target_modules, lora.train_embeddings
    )


def predict_speed(
    calibration: Calibration,
    gpu: Gpu,
    plan: MemoryPlan,
    train: TrainingRun,
    shape: ModelShape,
    flops_per_token: float,
    total_tokens: int,
    world_size: int = 1,
) -> SpeedPrediction:
    """The prediction for a run of `train` (`total_tokens` under `plan`) on `world_size` of `gpu`. A table
    without a row of the plan's checkpointing takes its no-checkpointing row over the plan's step time."""
    mode, params, dropout = train.mode, shape.total_params(), train.lora.dropout
    row = calibration.closest(mode, plan.checkpointing, params, dropout)
    mfu, how = (row.mfu, f"MFU of {row.describe()}") if row else (None, "")
    if row is None and (none := calibration.closest(mode, "none", params, dropout)) is not None:
        row, mfu = none, none.mfu / plan.relative_time
        how = f"MFU of {none.describe()} over the plan's step time x{plan.relative_time:.2f}"
    if row is None or not gpu.peak_bf16_tflops or not flops_per_token:
        why = "no peak TFLOP/s known for it" if row else f"the calibration table has no {mode} row"
        return SpeedPrediction(None, None, None, None, f"no prediction on {gpu.name}: {why}")
    tokens_per_second = mfu * gpu.peak_bf16_tflops * 1e12 / flops_per_token * world_size
    where = f"measured on {calibration.device}, {calibration.measured}"
    if calibration.device.lower() not in gpu.label.lower():
        where += f"; on {gpu.label} a prediction from another GPU (MFU does not transfer exactly)"
    return SpeedPrediction(
        tokens_per_second=tokens_per_second,
        hours=total_tokens / tokens_per_second / 3600,
        mfu=mfu,
        row=row,
        how=f"{how} ({where})",
    )

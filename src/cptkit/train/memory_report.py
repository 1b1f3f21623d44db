"""The memory plan's prediction against the measured peak: logged and written to run_meta.json
(`memory_plan`: the plan plus `measured_peak_bytes`) at the end of training, with a warning when the
two differ by more than `TOLERANCE` (the plan may then have chosen wrongly)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

from cptkit.train.memory import MemoryPlan, gib
from cptkit.train.meta import write_run_meta

log = logging.getLogger(__name__)

TOLERANCE = 0.10


def peak_record(plan: MemoryPlan, measured_bytes: int) -> tuple[dict[str, Any], str | None]:
    """(run_meta.json's `memory_plan` with the measured peak, the warning when it is off, else None)."""
    predicted = plan.estimate.total
    error = (measured_bytes - predicted) / predicted if predicted else 0.0
    record = {**plan.to_json(), "measured_peak_bytes": measured_bytes, "prediction_error": round(error, 4)}
    if abs(error) <= TOLERANCE:
        return record, None
    return record, (
        f"memory plan: measured peak {gib(measured_bytes)} vs predicted {gib(predicted)} ({error:+.0%}); "
        "the plan may be wrong here: set train.gradient_checkpointing (true/false) or train.memory_budget "
        "by hand"
    )


class MemoryReportCallback(TrainerCallback):
    """Measures the peak GPU memory of training (from its first step: loading is not counted) and
    compares it with `plan`. Nothing to do without a plan or a GPU."""

    def __init__(self, plan: MemoryPlan | None):
        self.plan = plan
        self.record: dict[str, Any] | None = None

    def _active(self) -> bool:
        return self.plan is not None and torch.cuda.is_available()

    def on_train_begin(self, args, state, control, **kwargs):
        if self._active():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, args, state, control, **kwargs):
        if not self._active():
            return
        self.record, warning = peak_record(self.plan, torch.cuda.max_memory_allocated())
        log.info(
            "memory plan: measured peak %s, predicted %s",
            gib(self.record["measured_peak_bytes"]),
            gib(self.plan.estimate.total),
        )
        if warning:
            log.warning(warning)
        if state.is_world_process_zero:
            write_run_meta(args.output_dir, memory_plan=self.record)

"""Downstream tasks during training (`eval.tasks[*].during_training`): at each held-out evaluation the
tasks run on the model in training (eval mode for the call, then back), so the loss of a capability
shows while it happens, not only at the end. Keep them small (`limit`): they run at every evaluation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from cptkit.eval.tasks import ReadyTask, run_tasks
from cptkit.train.callbacks import MetricsWriter

log = logging.getLogger(__name__)


def task_metrics(scores: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """Scores as flat log keys: `task/<name>/<metric>` and `task/<name>/<metric>_stderr`."""
    flat = {}
    for task, metrics in scores.items():
        for metric, m in metrics.items():
            flat[f"task/{task}/{metric}"] = m["value"]
            if m.get("stderr") is not None:
                flat[f"task/{task}/{metric}_stderr"] = m["stderr"]
    return flat


class DownstreamTaskCallback(TrainerCallback):
    """The tasks at the steps the held-out sets are scored (before the first step, every `eval_steps`,
    and at the end), each result a `{"type": "task", "step", "task/<name>/<metric>": value}` line of
    metrics.jsonl and a Trainer log (TensorBoard, W&B)."""

    def __init__(
        self,
        tasks: Sequence[ReadyTask],
        tokenizer: Any,
        eval_steps: int,
        writer: MetricsWriter,
        batch_size: int,
    ):
        self.tasks = list(tasks)
        self.tokenizer = tokenizer
        self.eval_steps = eval_steps
        self.writer = writer
        self.batch_size = batch_size
        self.trainer: Any = None  # set by add_task_callback, to send the numbers to the Trainer's log
        self.results: list[dict[str, Any]] = []

    def _scheduled(self, step: int) -> bool:
        return bool(self.eval_steps) and step % self.eval_steps == 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self._score(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._scheduled(state.global_step):
            self._score(state.global_step, model, control)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.eval_steps and not self._scheduled(state.global_step):
            self._score(state.global_step, model)

    def _score(self, step: int, model: Any, control: Any = None) -> None:
        if model is None:
            return
        scores = run_tasks(model, self.tokenizer, self.tasks, model.device, self.batch_size)
        record = {"type": "task", "step": step, **task_metrics(scores)}
        self.results.append(record)
        self.writer.write(record)
        for key, value in record.items():
            if key.startswith("task/") and not key.endswith("_stderr"):
                log.info("step %d %s: %.4f", step, key, value)
        if self.trainer is None:
            return
        # Trainer.log clears control.should_log, which the step's own training log still needs
        keep = control.should_log if control is not None else None
        self.trainer.log({k: v for k, v in record.items() if k.startswith("task/")})
        if control is not None:
            control.should_log = keep


def add_task_callback(trainer: Any, callbacks: dict[str, Any], tasks: Sequence[ReadyTask]) -> None:
    """Register the downstream task callback on `trainer` (as callbacks["tasks"]), on the held-out
    evaluation's schedule; no tasks, no callback."""
    if not tasks:
        return
    heldout = callbacks["heldout"]
    callback = DownstreamTaskCallback(
        tasks,
        trainer.processing_class,
        heldout.eval_steps,
        heldout.writer,
        trainer.args.per_device_eval_batch_size,
    )
    callback.trainer = trainer
    trainer.add_callback(callback)
    callbacks["tasks"] = callback

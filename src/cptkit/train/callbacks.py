"""What the Trainer does not measure for continued pretraining, as TrainerCallbacks: trained tokens/s,
MFU, peak memory, held-out loss, perplexity and bits per byte per set, and a metrics.jsonl file (the
divergence guard is `cptkit.train.guard`, the checkpoint markers `cptkit.train.checkpoints`)."""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from cptkit.model.flops import mfu
from cptkit.paths import METRICS
from cptkit.train.budget import ForgettingBudget
from cptkit.train.collator import IGNORE_INDEX
from cptkit.train.heldout import HeldoutSet, evaluate_set

log = logging.getLogger(__name__)

THROUGHPUT_STATE = "cptkit_throughput.json"


class CountingCollator:
    """Wraps a collator and remembers how many tokens of each batch carry a loss, in order, so the
    throughput callback can count exactly the tokens of each optimizer step (data loaders may fetch
    a batch ahead, so a running total would be one batch early)."""

    def __init__(self, collator: Callable[[Sequence[dict]], dict[str, torch.Tensor]]):
        self.collator = collator
        self.pending: deque[int] = deque()

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(rows)
        self.pending.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
        return batch

    def take(self, n: int) -> int:
        return sum(self.pending.popleft() for _ in range(min(n, len(self.pending))))


def _all_ranks_sum(value: float) -> float:
    """Sum over data-parallel ranks (each counts its own batches)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item())
    return value


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class MetricsWriter:
    """Appends one JSON object a line to metrics.jsonl (main process only)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class ThroughputCallback(TrainerCallback):
    """Trained (non-pad, loss-carrying) tokens/s, MFU and peak GPU memory, added to each train log; the
    whole log (loss, learning rate, grad norm, each loss term's metrics, ...) goes to metrics.jsonl.
    Time counts only the training steps, not evaluation or checkpointing."""

    def __init__(self, counter: CountingCollator, flops_per_token: float | None, writer: MetricsWriter):
        self.counter = counter
        self.flops_per_token = flops_per_token
        self.writer = writer
        self.trained_tokens = 0
        self.window_tokens = 0
        self.window_seconds = 0.0
        self.step_start = 0.0
        self.last: dict[str, float] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.window_seconds += time.perf_counter() - self.step_start
        tokens = self.counter.take(args.gradient_accumulation_steps)
        self.window_tokens += tokens

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        tokens = _all_ranks_sum(self.window_tokens)
        self.trained_tokens += int(tokens)
        record: dict[str, Any] = {"trained_tokens": self.trained_tokens}
        if self.window_seconds > 0:
            tps = tokens / self.window_seconds
            record["tokens_per_second"] = round(tps, 1)
            if self.flops_per_token:
                value = mfu(tps, self.flops_per_token, num_devices=_world_size())
                if value is not None:
                    record["mfu"] = round(value, 4)
        if torch.cuda.is_available():
            record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.window_tokens, self.window_seconds = 0, 0.0
        logs.update(record)
        self.last = record
        first = {"loss": logs.get("loss"), "learning_rate": logs.get("learning_rate"), "grad_norm": None}
        self.writer.write({"type": "train", "step": state.global_step, **first, **logs})

    def on_save(self, args, state, control, **kwargs):
        """The count of trained tokens travels with each checkpoint, so a resumed run continues it."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / THROUGHPUT_STATE).write_text(json.dumps({"trained_tokens": self.trained_tokens}))

    def restore(self, checkpoint: str | Path) -> None:
        path = Path(checkpoint) / THROUGHPUT_STATE
        if path.is_file():
            self.trained_tokens = int(json.loads(path.read_text())["trained_tokens"])


class HeldoutEvalCallback(TrainerCallback):
    """Every `eval_steps` steps (and before the first), loss, perplexity and bits per byte on each
    held-out set, logged with its role (domain or general) so forgetting shows during training.

    With a forgetting budget (`cptkit.train.budget`) each evaluation is judged against the base's at
    step 0, and the sets are evaluated at every save step too, so each checkpoint has the numbers that
    decide whether it is the best within the budget; a crossing stops training when the budget says so."""

    def __init__(
        self,
        sets: list[HeldoutSet],
        pad_id: int,
        batch_size: int,
        eval_steps: int,
        writer: MetricsWriter,
        budget: ForgettingBudget | None = None,
    ):
        self.sets = sets
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.eval_steps = eval_steps
        self.writer = writer
        self.budget = budget
        self.trainer: Any = None  # set by build_trainer, to send the numbers to TensorBoard/W&B too
        self.results: list[dict[str, Any]] = []
        self.last_step: int | None = None

    def _run(self, state, model, control=None) -> None:
        if not self.sets or model is None:
            return
        self.last_step = state.global_step
        logs, results = {}, []
        for heldout in self.sets:
            result = {
                "type": "eval",
                "step": state.global_step,
                **evaluate_set(model, heldout, self.batch_size, self.pad_id),
            }
            results.append(result)
            self.writer.write(result)
            logs[f"heldout_{heldout.name}_loss"] = round(result["loss"], 4)
            bpb = f", {result['bits_per_byte']:.4f} bits per byte" if result["bits_per_byte"] else ""
            log.info(
                "step %d held-out %s (%s): loss %.4f perplexity %.2f over %d tokens%s",
                state.global_step,
                heldout.name,
                heldout.role,
                result["loss"],
                result["perplexity"],
                result["tokens"],
                bpb,
            )
        # at max_steps training ends anyway: a crossing there is not a stop
        early = control is not None and state.global_step < state.max_steps
        self.observe(state.global_step, results, control if early else None)
        if self.trainer is not None:
            should_log = control.should_log if control is not None else False
            self.trainer.log(logs)  # resets control.should_log, which the step's own log still needs
            if control is not None:
                control.should_log = should_log

    def observe(self, step: int, results: list[dict[str, Any]], control=None) -> None:
        """Take one evaluation's results (every set's at `step`): kept for the run summary and judged
        against the forgetting budget, which may stop training through `control`."""
        self.results += results
        if self.budget is None:
            return
        check = self.budget.observe(step, results)
        if control is not None and self.budget.should_stop(check):
            control.should_training_stop = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self._run(state, model)
        elif self.budget is not None:  # resumed: the base's numbers are in metrics.jsonl
            self.budget.restore(Path(args.output_dir) / METRICS, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        due = bool(self.eval_steps) and state.global_step % self.eval_steps == 0
        if due or (self.budget is not None and control.should_save):
            self._run(state, model, control)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # the last step, unless it was evaluated (an eval step or, with a budget, a save step)
        step = state.global_step
        if self.eval_steps and step % self.eval_steps != 0 and self.last_step != step:
            self._run(state, model)

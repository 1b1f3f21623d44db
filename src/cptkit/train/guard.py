"""The divergence guard: stops a run whose loss broke, and says which checkpoint is still good.

A NaN/inf loss or grad norm stops at once. Divergence that stays finite is caught too (`train.guard`):
- collapse: the loss at (or within `uniform_margin` of) ln(vocabulary size), the loss of guessing
  uniformly, for `patience` logged steps, after it had been well below it (a random model starts at
  about ln(vocabulary size), so that alone says nothing);
- vanished gradients: a grad norm of exactly 0 for `patience` logged steps;
- a spike: a loss above `spike_factor` times the median of the `window` logged losses before it.
The decision is the pure function `judge` over the logged numbers. The run's checkpoints saved after the
last good logged step are marked diverged (kept, never resumed); the message names the last good one.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from cptkit.config.train import GuardConfig
from cptkit.train.checkpoints import checkpoint_step, mark_diverged, scan_checkpoints

log = logging.getLogger(__name__)

# how far below the uniform loss a run must have been before a return to it counts as a collapse
LEARNED_MARGIN = 1.0
# a spike is also this many nats above the median: at losses near 0 (late SFT) a factor alone is noise
SPIKE_FLOOR = 1.0


@dataclass(frozen=True)
class Logged:
    """One training log: the step, its loss and grad norm (None when not logged)."""

    step: int
    loss: float
    grad_norm: float | None = None


@dataclass(frozen=True)
class Verdict:
    """Why the run stops: `rule` (non_finite, collapse, zero_grad, spike), what was seen, the first bad
    logged step (`since`), the step it stopped at, and the last logged step before the trouble."""

    rule: str
    what: str
    since: int
    step: int
    last_good_step: int


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def judge(history: Sequence[Logged], uniform_loss: float | None, cfg: GuardConfig) -> Verdict | None:
    """The verdict on a run from its logged losses so far (oldest first), or None while it is healthy.
    Only the newest entry can start a verdict: call it after each log."""
    if not history:
        return None
    now = history[-1]

    def before(index: int) -> int:
        return history[index - 1].step if index > 0 else 0

    for key, value in (("loss", now.loss), ("grad norm", now.grad_norm)):
        if not _finite(value):
            return Verdict(
                "non_finite", f"the {key} became {value}", now.step, now.step, before(len(history) - 1)
            )
    if not cfg.enabled:
        return None
    streak = history[-cfg.patience :] if len(history) >= cfg.patience else []
    first = len(history) - cfg.patience
    if uniform_loss is not None and streak:
        learned = any(h.loss < uniform_loss - LEARNED_MARGIN for h in history[:first])
        if learned and all(h.loss >= uniform_loss - cfg.uniform_margin for h in streak):
            what = (
                f"the loss went back to {now.loss:.4f}, the loss of guessing uniformly "
                f"(ln(vocabulary size) = {uniform_loss:.4f}), for {cfg.patience} logged steps"
            )
            return Verdict("collapse", what, streak[0].step, now.step, before(first))
    if streak and all(h.grad_norm == 0 for h in streak):
        what = f"the grad norm was exactly 0 for {cfg.patience} logged steps (loss {now.loss:.4f})"
        return Verdict("zero_grad", what, streak[0].step, now.step, before(first))
    if len(history) >= cfg.window + cfg.patience:
        spike = history[-cfg.patience :]
        median = statistics.median(h.loss for h in history[-cfg.window - cfg.patience : -cfg.patience])
        if median > 0 and all(
            h.loss > cfg.spike_factor * median and h.loss - median > SPIKE_FLOOR for h in spike
        ):
            what = (
                f"the loss stayed over {cfg.spike_factor:g} times the median {median:.4f} of the "
                f"{cfg.window} logged steps before (and {SPIKE_FLOOR:g} nat above it) for {cfg.patience} "
                f"logged steps, up to {now.loss:.4f}"
            )
            return Verdict("spike", what, spike[0].step, now.step, before(len(history) - cfg.patience))
    return None


def uniform_loss(model: Any) -> float | None:
    """ln(vocabulary size): the loss of a model that guesses every token equally."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "vocab_size", None)
    return math.log(size) if size else None


class DivergenceGuard(TrainerCallback):
    """Judges each training log (and, when a checkpoint is due, the weights it would hold); on a
    verdict it stops training without saving. `verdict` tells `fit` what happened."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.history: list[Logged] = []
        self.uniform: float | None = None
        self.verdict: Verdict | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.uniform = uniform_loss(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or self.verdict is not None:
            return
        grad = logs.get("grad_norm")
        self.history.append(
            Logged(state.global_step, float(logs["loss"]), None if grad is None else float(grad))
        )
        self.verdict = judge(self.history, self.uniform, self.cfg)
        if self.verdict is not None:
            control.should_training_stop = True
            control.should_save = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # a checkpoint is due: make sure the weights it would hold are finite (the loss may not be
        # logged every step, so on_log alone could miss a NaN that happened since the last log)
        if control.should_save and model is not None and self.verdict is None:
            bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
            if _on_any_rank(bool(bad)):  # sharded weights: every rank must stop, or the others hang saving
                last = self.history[-1].step if self.history else 0
                where = f"{bad[0]} and {len(bad) - 1} more" if bad else "on another process's shard"
                what = f"the weights became non-finite ({where})"
                self.verdict = Verdict("non_finite", what, state.global_step, state.global_step, last)
                control.should_training_stop = True
                control.should_save = False

    def trusted_step(self) -> int | None:
        """While the newest logs look bad (a streak has begun), the last logged step before them: the
        checkpoint rotation keeps the newest checkpoint at or before it."""
        if self.verdict is not None:
            return self.verdict.last_good_step
        recent = self.history[-self.cfg.patience :]
        if self.uniform is None or not recent:
            return None
        bad = [h.loss >= self.uniform - self.cfg.uniform_margin or h.grad_norm == 0 for h in recent]
        if not bad[-1]:
            return None
        first_bad = len(bad) - 1
        while first_bad > 0 and bad[first_bad - 1]:
            first_bad -= 1
        index = len(self.history) - len(recent) + first_bad
        return self.history[index - 1].step if index > 0 else 0

    def keep(self, output_dir: str | Path) -> Path | None:
        """The checkpoint that rotation must not delete now (see `trusted_step`)."""
        step = self.trusted_step()
        if step is None:
            return None
        good = [c for c in scan_checkpoints(output_dir).complete if checkpoint_step(c) <= step]
        return good[-1] if good else None


def report_divergence(output_dir: str | Path, verdict: Verdict, write: bool) -> tuple[str, dict[str, Any]]:
    """Mark the checkpoints saved after the last good step as diverged (when `write`: the main process)
    and return the message for the user and the record for run_meta.json."""
    if write:
        marked = mark_diverged(output_dir, verdict.last_good_step, verdict.since, verdict.what)
    else:
        marked = [
            c for c in scan_checkpoints(output_dir).complete if checkpoint_step(c) > verdict.last_good_step
        ]
    good = [c for c in scan_checkpoints(output_dir).complete if checkpoint_step(c) <= verdict.last_good_step]
    last_good = good[-1] if good else None
    message = f"training stopped at step {verdict.step}: {verdict.what}"
    if verdict.since != verdict.step:
        message += f" (from step {verdict.since})"
    if marked:
        names = ", ".join(c.name for c in marked)
        message += (
            f"; {names} saved after the last good step ({verdict.last_good_step}) hold these weights and are "
            "marked diverged (kept, never resumed)"
        )
    else:
        message += "; no checkpoint of these weights was written"
    if last_good is not None:
        message += (
            f". The last good checkpoint is {last_good}. Lower train.hf.learning_rate (or change train.schedule "
            "or set train.hf.max_grad_norm) and rerun the same command: it continues from that checkpoint "
            "with a fresh optimizer and the new schedule"
        )
    else:
        message += (
            ". No checkpoint was saved before it. Lower train.hf.learning_rate (or change train.schedule "
            "or set train.hf.max_grad_norm) and rerun the same command: it trains again from the start"
        )
    record = {
        "rule": verdict.rule,
        "what": verdict.what,
        "since": verdict.since,
        "step": verdict.step,
        "last_good_checkpoint": str(last_good) if last_good else None,
        "diverged_checkpoints": [str(c) for c in marked],
    }
    return message, record


def _on_any_rank(flag: bool) -> bool:
    """`flag` of any process of a distributed run (itself when there is no process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())

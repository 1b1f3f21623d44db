"""A stall watchdog: with `CPTKIT_STALL_DUMP_S=N` in the environment, each process of a run (every rank
under `accelerate launch`, which passes the environment on) writes the stack of each of its threads to
stderr once N seconds pass without a training step, an evaluation or a save finishing, and again every
N seconds while the stall lasts. A multi-GPU hang (one rank waiting in a collective the others never
join) then shows where every rank is, instead of a silent process.

The watch is a daemon thread that waits on an event: blocked collectives, sleeps and I/O release the
GIL, so it runs while the main thread is stuck. Training is never stopped by it."""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import tempfile
import threading
import time

from transformers import TrainerCallback

from cptkit.errors import CptkitError

log = logging.getLogger(__name__)

STALL_ENV = "CPTKIT_STALL_DUMP_S"
HEADER = "cptkit stall watchdog: rank {rank} of {world}: {seconds:.0f} s since {what}; every thread's stack:"


def stall_seconds() -> float | None:
    """`CPTKIT_STALL_DUMP_S` as seconds (None when unset or empty)."""
    text = os.environ.get(STALL_ENV, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise CptkitError(f"{STALL_ENV}={text!r}: expected a number of seconds above 0 (or unset)")
    return seconds


class StallWatchdog(TrainerCallback):
    """Dumps every thread's stack (with a header naming the rank) after `seconds` without progress.

    Progress is the end of a step (after cptkit's held-out evaluation there, so keep this callback
    after it), an evaluation, a save or a log; the watch starts when the Trainer is built, so a hang
    while the model is wrapped or the first batch gathered is caught too, and ends with training."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.what = "the trainer was built"
        self.last = time.monotonic()
        self.rank, self.world = _rank()
        self.beat = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="cptkit-stall-watchdog", daemon=True)
        self.thread.start()
        log.info("stall watchdog: every thread's stack after %.0f s without a step (%s)", seconds, STALL_ENV)

    def _progress(self, what: str) -> None:
        self.what, self.last = what, time.monotonic()
        self.beat.set()

    def _watch(self) -> None:
        while not self.done.is_set():
            if self.beat.wait(self.seconds):
                self.beat.clear()
                continue
            if self.done.is_set():
                return
            header = HEADER.format(
                rank=self.rank, world=self.world, seconds=time.monotonic() - self.last, what=self.what
            )
            _write_whole(f"{header}\n{_stacks()}\n")

    def stop(self) -> None:
        self.done.set()
        self.beat.set()

    def on_train_begin(self, args, state, control, **kwargs):
        self.rank, self.world = args.process_index, args.world_size
        self._progress("training began")

    def on_step_end(self, args, state, control, **kwargs):
        self._progress(f"step {state.global_step} ended")

    def on_evaluate(self, args, state, control, **kwargs):
        self._progress(f"an evaluation at step {state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        self._progress(f"the save at step {state.global_step}")

    def on_log(self, args, state, control, **kwargs):
        self._progress(f"the log at step {state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()


def _stacks() -> str:
    """Every thread's Python stack, as faulthandler writes it (it needs a real file)."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        return f.read()


def _write_whole(text: str) -> None:
    """One write to stderr, so the ranks sharing a launcher's stderr do not interleave their lines."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr without a descriptor (captured)
        sys.stderr.write(text)
        return
    sys.stderr.flush()
    os.write(fd, text.encode())


def _rank() -> tuple[int, int]:
    """This process's rank and the world size as the launcher set them (0 of 1 without one)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

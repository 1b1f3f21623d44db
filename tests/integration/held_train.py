"""`python -m held_train CONFIG.yaml` (launched by the scale-out tests): `cptkit train CONFIG.yaml` with
one more callback that holds chosen ranks in `time.sleep` at a chosen event, as a hung rank would.

`HELD_AT=EVENT:STEP:RANKS` picks it: `save:2:0,1` holds every rank just after checkpoint-2 is
complete (so a test can kill the run there, with no race against steps 3 and 4); `step_end:2:1`
holds rank 1 after step 2 while rank 0 goes on into step 3's collectives and waits there."""

from __future__ import annotations

import os
import sys
import time

from transformers import TrainerCallback

import cptkit.train.build as build
from cptkit.cli import main

HOLD_S = 600


class Hold(TrainerCallback):
    def __init__(self, event: str, step: int, ranks: set[int]):
        self.event, self.step, self.ranks = event, step, ranks

    def _maybe_hold(self, event: str, args, state) -> None:
        if event == self.event and state.global_step == self.step and args.process_index in self.ranks:
            sys.stderr.write(f"held_train: rank {args.process_index} held at {event} {state.global_step}\n")
            sys.stderr.flush()
            time.sleep(HOLD_S)

    def on_save(self, args, state, control, **kwargs):
        self._maybe_hold("save", args, state)

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe_hold("step_end", args, state)


def _with_hold(original):
    event, step, ranks = os.environ["HELD_AT"].split(":")

    def build_trainer(*args, **kwargs):
        trainer, callbacks = original(*args, **kwargs)
        trainer.add_callback(Hold(event, int(step), {int(r) for r in ranks.split(",")}))
        return trainer, callbacks

    return build_trainer


if __name__ == "__main__":
    build.build_trainer = _with_hold(build.build_trainer)
    raise SystemExit(main(["train", *sys.argv[1:]]))

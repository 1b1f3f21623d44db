"""The stall watchdog in one process: CPTKIT_STALL_DUMP_S parsed, a stack with a rank header written
whole once no step comes in time, nothing while steps come, and nothing after training ends."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from cptkit.errors import CptkitError
from cptkit.train.stall import STALL_ENV, StallWatchdog, stall_seconds


def test_the_variable_is_seconds_above_zero(monkeypatch):
    monkeypatch.delenv(STALL_ENV, raising=False)
    assert stall_seconds() is None
    monkeypatch.setenv(STALL_ENV, "90")
    assert stall_seconds() == 90.0
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(STALL_ENV, bad)
        with pytest.raises(CptkitError, match=STALL_ENV):
            stall_seconds()


def _waits_here(seconds: float) -> None:
    time.sleep(seconds)


def test_a_stall_writes_every_threads_stack_and_steps_keep_it_quiet(capfd):
    args = SimpleNamespace(process_index=1, world_size=2)
    watchdog = StallWatchdog(0.3)
    try:
        watchdog.on_train_begin(args, SimpleNamespace(global_step=0), None)
        for step in range(1, 6):  # steps in time: no dump
            time.sleep(0.1)
            watchdog.on_step_end(args, SimpleNamespace(global_step=step), None)
        assert "cptkit stall watchdog" not in capfd.readouterr().err
        _waits_here(0.5)
    finally:
        watchdog.stop()
    err = capfd.readouterr().err
    assert "cptkit stall watchdog: rank 1 of 2:" in err and "since step 5 ended" in err
    assert "_waits_here" in err  # the main thread's stack, where it waits
    watchdog.thread.join(timeout=2)
    assert not watchdog.thread.is_alive()

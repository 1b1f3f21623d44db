"""One run per output folder: the lock beside the folder, its refusals, stale locks, release."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from cptkit.errors import CptkitError
from cptkit.locks import folder_lock, lock_path


def hold(folder, pid, host=None, command="cptkit prepare"):
    """A lock file as a run with `pid` on `host` (default: this host) leaves it."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "started": "2025-01-02T12:03:00+00:00"}
    path.write_text(json.dumps({**record, "command": command, "token": "theirs"}))
    return path


def gone_pid() -> int:
    """The pid of a process that has finished."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_the_lock_sits_beside_the_folder_and_is_gone_after_the_block(tmp_path):
    folder = tmp_path / "run" / "data"
    with folder_lock(folder, "cptkit prepare") as path:
        assert path == tmp_path / "run" / ".data.cptkit.lock"
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["command"] == "cptkit prepare"
        assert not folder.exists()  # nothing inside the folder, which may not even exist yet
    assert not path.exists()


def test_the_lock_is_gone_after_a_failure(tmp_path):
    with pytest.raises(RuntimeError), folder_lock(tmp_path / "out", "cptkit train"):
        raise RuntimeError("boom")
    assert not lock_path(tmp_path / "out").exists()


def test_a_folder_in_use_by_a_live_process_is_refused_with_its_pid_and_host(tmp_path):
    path = hold(tmp_path / "data", os.getpid())
    with pytest.raises(CptkitError) as e, folder_lock(tmp_path / "data", "cptkit prepare"):
        pytest.fail("the block must not run")
    message = str(e.value)
    assert (
        f"in use by pid {os.getpid()} on host {socket.gethostname()} since 12:03 (cptkit prepare)" in message
    )
    assert f"remove {path}" in message
    assert json.loads(path.read_text())["token"] == "theirs"  # the holder's lock is left alone


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    with folder_lock(tmp_path / "data", "cptkit prepare"):
        with (
            pytest.raises(CptkitError, match="in use by pid"),
            folder_lock(tmp_path / "data", "cptkit prepare"),
        ):
            pass
        assert lock_path(tmp_path / "data").exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = gone_pid()
    hold(tmp_path / "data", dead)
    with (
        caplog.at_level(logging.WARNING, "cptkit.locks"),
        folder_lock(tmp_path / "data", "cptkit train") as path,
    ):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of pid {dead}" in caplog.text
    assert not path.exists()


def test_a_lock_from_another_host_is_refused(tmp_path):
    hold(tmp_path / "data", gone_pid(), host="elsewhere.example")
    with pytest.raises(CptkitError, match="on host elsewhere.example"), folder_lock(tmp_path / "data", "x"):
        pass


def test_an_unreadable_lock_is_refused(tmp_path):
    lock_path(tmp_path / "data").write_text("")
    with pytest.raises(CptkitError, match="cannot be read"), folder_lock(tmp_path / "data", "x"):
        pass


def test_ranks_after_the_first_neither_take_nor_check_the_lock(tmp_path):
    hold(tmp_path / "data", os.getpid())
    code = (
        "import sys; from cptkit.locks import folder_lock\n"
        "with folder_lock(sys.argv[1], 'cptkit train') as p: print(p)\n"
    )
    env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "data")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    env["RANK"] = "0"
    refused = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "data")], env=env, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "in use by pid" in refused.stderr


def test_a_running_holder_keeps_its_lock_whatever_its_file_says_and_a_killed_one_loses_it(tmp_path, caplog):
    """The flock, not the pid in the file, says whether the holder runs: a lock whose record names a
    dead pid (a pid reused, a record rewritten) is still refused while its holder runs, and a holder
    killed with SIGKILL leaves a lock the next run takes over."""
    import signal
    import time

    folder = tmp_path / "data"
    code = (
        "import sys, time; from cptkit.locks import folder_lock\n"
        "with folder_lock(sys.argv[1], 'cptkit prepare'):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        hold(folder, gone_pid())  # the record now names a process that is gone
        with pytest.raises(CptkitError, match="in use by pid"), folder_lock(folder, "cptkit prepare"):
            pytest.fail("two runs in one folder")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    with caplog.at_level(logging.WARNING, "cptkit.locks"), folder_lock(folder, "cptkit train") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text

"""One run per output folder: a lock file beside the folder, held for the whole stage.

`RUN_DIR/data` is locked by `RUN_DIR/.data.cptkit.lock`, which holds the holder's pid, host, start time
and command as JSON. It sits beside the folder rather than in it, so nothing that lists or fingerprints
the folder (resume, `cptkit run`'s stamps, the foreign-folder checks) ever sees it, and a folder that is
replaced whole (a merge's temp folder renamed into place) stays locked. It is created atomically
and held with an exclusive `flock` for as long as the run lasts (the kernel lets go of it when the
process ends, however it ends), so of two runs started at once exactly one gets it; the file is removed
when the stage ends, whether it succeeded or failed. A lock left by a process that is gone (same host,
pid not alive, nobody holding its flock) is taken over with a warning; one from another host cannot be
checked and is refused.

Under `accelerate launch` only the main process (RANK 0) takes the lock; the other ranks of the same run
neither take nor check it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from cptkit.errors import CptkitError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".cptkit.lock"

F = TypeVar("F", bound=Callable[..., Any])


def lock_path(folder: str | Path) -> Path:
    """The lock file of an output folder: `.<name>.cptkit.lock` beside it."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}{LOCK_SUFFIX}"


def is_main_process() -> bool:
    """True except on the ranks > 0 of a distributed launch (RANK, else LOCAL_RANK, as torchrun sets them)."""
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    return int(rank or 0) == 0


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: str | Path, command: str) -> Iterator[Path | None]:
    """Hold `folder`'s lock for the `with` block (`command` names the holder in refusals, e.g.
    "cptkit prepare"). Yields the lock file, or None on the ranks > 0 of a distributed run."""
    if not is_main_process():
        yield None
        return
    path = lock_path(folder)
    fd, token = _acquire(path, Path(folder), command)
    try:
        yield path
    finally:
        _release(path, fd, token)


def _acquire(path: Path, folder: Path, command: str) -> tuple[int, str]:
    """Open the lock file and hold an exclusive `flock` on it for as long as the run lasts: the kernel
    releases it when the process ends, however it ends, so a lock nobody holds is stale for certain on
    this host, and taking it over happens under the flock (two runs cannot both take it). The JSON
    inside is for messages, and for a holder on another host, which a flock cannot see."""
    token = uuid.uuid4().hex
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "token": token,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(10):  # again only when the file was replaced between opening and locking it
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:  # released meanwhile: create it
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CptkitError(_refusal(folder, path, _read(path, settle_s=0.5))) from None
        if not _same_file(fd, path):  # its holder removed it as we opened it: open the new one
            os.close(fd)
            continue
        try:
            if not created:
                _check_takeover(fd, path, folder)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        except BaseException:  # refused, or (a full disk) an empty lock would turn every later run away
            os.close(fd)
            raise
        return fd, token
    raise CptkitError(_refusal(folder, path, _read(path)))


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _check_takeover(fd: int, path: Path, folder: Path) -> None:
    """Under the flock: a lock file found (nobody holds its flock) may be taken over when a process of
    this host that is gone left it; one that cannot be read (a holder on another host still writing it,
    whose flock this host cannot see) is refused."""
    data = os.pread(fd, 1 << 16, 0)
    if not data:
        time.sleep(0.5)
        data = os.pread(fd, 1 << 16, 0)
    try:
        holder = json.loads(data)
    except ValueError:
        holder = None
    if not isinstance(holder, dict) or not _stale(holder):
        raise CptkitError(_refusal(folder, path, holder if isinstance(holder, dict) else None))
    log.warning(
        "%s: taking over the lock of pid %s (%s), which is no longer running",
        folder,
        holder.get("pid"),
        holder.get("command", "cptkit"),
    )


def _release(path: Path, fd: int, token: str) -> None:
    """Remove the lock file (still under the flock, so no run can take it meanwhile), then let go."""
    try:
        holder = _read(path)
        if holder is not None and holder.get("token") == token and _same_file(fd, path):
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _read(path: Path, settle_s: float = 0.0) -> dict[str, Any] | None:
    """The lock's record, or None when it cannot be read; `settle_s` waits that long for a lock that
    another run has just created but not written yet."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return None
        time.sleep(0.02)


def _stale(holder: dict[str, Any]) -> bool:
    """Left by a process of this host that is gone; a lock from another host cannot be checked."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


def _refusal(folder: Path, path: Path, holder: dict[str, Any] | None) -> str:
    if holder is None:
        return (
            f"{folder} is in use by another cptkit run (its lock {path} cannot be read); wait for it or, "
            f"if no cptkit run is working on {folder}, remove {path}"
        )
    started = str(holder.get("started", "?"))
    since = started[11:16] if len(started) >= 16 else started
    return (
        f"{folder} is in use by pid {holder.get('pid')} on host {holder.get('host')} since {since} "
        f"({holder.get('command', 'cptkit')}); wait for it or, if that process is gone, remove {path}"
    )


def locks_stage_folder(stage: str) -> Callable[[F], F]:
    """Decorate a command's `run(cfg, ...)` so that the stage's output folder (`resolve(cfg).folder(stage)`)
    is locked for the whole run, checks included."""

    def decorate(run: F) -> F:
        @functools.wraps(run)
        def locked(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            from cptkit.paths import resolve

            with folder_lock(resolve(cfg).folder(stage), f"cptkit {stage}"):
                return run(cfg, *args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate

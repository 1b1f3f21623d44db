"""Disk space: refusing a write that cannot finish, and a full disk (or quota) said in one line.

A long write whose size is known is checked first (`check_free_space`); any write may still meet a
full disk, which `reporting_disk_full` turns from an `OSError` deep in pyarrow, torch or safetensors
into a `CptkitError` naming the folder and what is free. Callers remove their own temporaries.
`free_space` arguments (a function of a path, giving free bytes) let a caller or a test say what is free.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from cptkit.errors import CptkitError

FreeSpace = Callable[[Path], int]

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def existing_parent(path: str | Path) -> Path:
    """`path`, or its nearest parent that exists (where the disk's free space is read)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_bytes(path: str | Path) -> int:
    """Free bytes on the disk that holds (or will hold) `path`."""
    return shutil.disk_usage(existing_parent(path)).free


def human(n: float) -> str:
    """Bytes for a message: 1.23 GB, 45.6 MB, 789 B."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def check_free_space(
    folder: str | Path, needed_bytes: int, what: str, hint: str, free_space: FreeSpace = free_bytes
) -> None:
    """Refuse to start a write of about `needed_bytes` into `folder` that cannot finish (the free space
    must hold it plus 5%). `what` names the output ("the prepared dataset"), `hint` says what to do."""
    free = free_space(Path(folder))
    if free < needed_bytes * 1.05:
        raise CptkitError(
            f"{folder}: not enough disk space: {what} needs about {human(needed_bytes)}, "
            f"{human(free)} are free on {existing_parent(folder)}; {hint}"
        )


# how writers that do not raise OSError report a full disk: torch.save's zip writer raises RuntimeError
# ("PytorchStreamWriter failed writing file ...: file write failed"), safetensors a SafetensorError
# carrying the OS error text ("No space left on device (os error 28)")
_FULL_TEXTS = (
    "no space left on device",
    "os error 28",
    "disk quota exceeded",
    "os error 122",
    "file write failed",
)


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in DISK_FULL
    textual = isinstance(error, RuntimeError) or type(error).__name__ == "SafetensorError"
    return textual and any(text in str(error).lower() for text in _FULL_TEXTS)


def disk_full_message(folder: str | Path, error: BaseException, hint: str) -> str:
    quota = getattr(error, "errno", None) == errno.EDQUOT or "quota" in str(error).lower()
    reason = "disk quota exceeded" if quota else "no space left on device"
    where = existing_parent(folder)
    return f"{folder}: the disk is full ({reason}) with {human(free_bytes(where))} free on {where}; {hint}"


@contextlib.contextmanager
def reporting_disk_full(folder: str | Path, hint: str) -> Iterator[None]:
    """Turn a full disk met while writing into `folder` into a one-line `CptkitError`."""
    try:
        yield
    except Exception as e:  # narrowed at once: only a full disk is caught
        if not is_disk_full(e):
            raise
        raise CptkitError(disk_full_message(folder, e, hint)) from None

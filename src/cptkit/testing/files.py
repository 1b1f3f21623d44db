"""Input files that fail in ways a corpus does, for tests of the readers and of prepare."""

from __future__ import annotations

import os
from pathlib import Path


def make_unreadable(path: str | Path) -> bool:
    """Make `path` a file that lists and stats fine but whose read fails, also for root (whom chmod 000
    does not stop): a file without permissions, else a link to /proc/self/mem (reading its offset 0 fails
    with EIO, whoever reads it). False where neither kind can be made."""
    path = Path(path)
    if os.geteuid() != 0:
        path.write_text("secret", encoding="utf-8")
        path.chmod(0)
        return True
    if os.path.exists("/proc/self/mem"):
        os.symlink("/proc/self/mem", path)
        return True
    return False

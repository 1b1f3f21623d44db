"""What every output folder records about how it was made: the resolved config and the versions."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from cptkit import __version__
from cptkit.config import Config, dump_yaml
from cptkit.paths import CONFIG, RECORD_KEY, resolve

_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "peft",
    "accelerate",
    "trl",
    "bitsandbytes",
    "liger-kernel",
    "deepspeed",
)


def versions() -> dict[str, str]:
    found = {"cptkit": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_config(folder: str | Path, config: Any) -> None:
    """Write the resolved config (`config.yaml`) into an output folder. A run's `Config` is followed by
    the folders it resolves to (`paths:`, see `cptkit.paths`), which loading the file back skips."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = dump_yaml(config)
    if isinstance(config, Config):
        record = {RECORD_KEY: resolve(config).to_record()}
        text += "# where this run's stages read and write, as resolved (skipped when loaded back)\n"
        text += dump_yaml(record)
    _write_text(folder / CONFIG, text)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically: a reader never sees a half-written file."""
    _write_text(Path(path), json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def temporary_beside(path: Path) -> Path:
    """A temporary name beside `path` no other process writes, on this machine or another sharing the
    folder (host, process id and a random part: process ids repeat across machines and containers)."""
    import socket
    import uuid

    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary beside `path`, then rename it into place; a failed write (a full
    disk) removes the temporary and leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)  # its own: machines may share the folder
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

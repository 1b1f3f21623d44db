"""Stage stamps: a hash of what a stage depends on, so a finished stage with the same inputs and
config is skipped, and anything that changes upstream reruns everything after it.

A stamp covers the resolved config sections the stage reads and its input files: small files (the
manifests and run records other stages write) by content, large files and folders by name, size and
modification time, which is cheap on hundreds of GB. The record of each finished stage also holds a
hash of its output's marker file, so an output rewritten by another command is not mistaken for ours.
The records live in RUN_DIR/.cptkit/stages.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cptkit.outputs import now, write_json

SMALL_FILE = 1 << 20


def _file_entry(path: Path) -> list[Any]:
    stat = path.stat()
    if stat.st_size <= SMALL_FILE:
        return [str(path), hashlib.sha256(path.read_bytes()).hexdigest()]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def fingerprint(path: str | Path) -> list[Any]:
    """What identifies a file or folder's content, cheaply (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        return [_file_entry(path)]
    if not path.is_dir():
        return [[str(path), "missing"]]
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            stat = p.stat()
            entries.append([str(p.relative_to(path)), stat.st_size, stat.st_mtime_ns])
    return [[str(path), hashlib.sha256(json.dumps(entries).encode()).hexdigest()]]


STAMP_VERSION = 2  # 2: config fields at their defaults are left out of the stamp


def settings(value: Any) -> Any:
    """A config value as its stamp sees it: of each dataclass only the fields that differ from their
    defaults, so a field added to the schema later (at its default) changes no stamp."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.default is not dataclasses.MISSING and v == f.default:
                continue
            if f.default_factory is not dataclasses.MISSING and v == f.default_factory():
                continue
            out[f.name] = settings(v)
        return out
    if isinstance(value, (list, tuple)):
        return [settings(v) for v in value]
    if isinstance(value, dict):
        return {k: settings(v) for k, v in value.items()}
    return value


def stamp(sections: dict[str, Any], inputs: list[str | Path]) -> str:
    """The stamp of a stage: the settings of its config sections and its inputs' fingerprints."""
    data = {
        "sections": {name: settings(value) for name, value in sections.items()},
        "inputs": [fingerprint(p) for p in inputs],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def marker_hash(marker: Path) -> str | None:
    return hashlib.sha256(marker.read_bytes()).hexdigest()[:16] if marker.is_file() else None


class StageRecords:
    """RUN_DIR/.cptkit/stages.json: one record per stage (stamp, status, seconds, output)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".cptkit" / "stages.json"
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self.records = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                self.records = {}  # unreadable records only cost a rerun

    def is_current(self, name: str, stage_stamp: str, marker: Path) -> bool:
        """Finished before with the same stamp, and its output is still the one it wrote."""
        record = self.records.get(name, {})
        return (
            record.get("status") == "complete"
            and record.get("stamp") == stage_stamp
            and record.get("marker_hash") is not None
            and record.get("marker_hash") == marker_hash(marker)
        )

    def holds_stale_output(self, name: str, stage_stamp: str, marker: Path) -> bool:
        """The stage's folder holds a finished run this pipeline wrote, for other settings or asked to be
        redone: rerunning must start over rather than resume its last checkpoint. A failed run is never
        removed: its checkpoints are what a rerun continues from (after a divergence, with the lower
        learning rate the message advises; the training stage itself refuses a folder of another run);
        an output another command rewrote since is not ours to remove."""
        record = self.records.get(name)
        if not record or record.get("status") != "complete":
            return False
        return record.get("marker_hash") is not None and record.get("marker_hash") == marker_hash(marker)

    def made_by_older_stamps(self, name: str) -> bool:
        """The stage's record was written by a cptkit whose stamps were computed another way: a stamp
        that differs says nothing about its settings."""
        record = self.records.get(name)
        return bool(record) and record.get("stamp_version") != STAMP_VERSION

    def is_complete(self, name: str, marker: Path) -> bool:
        return self.records.get(name, {}).get("status") == "complete" and marker.is_file()

    def record(self, name: str, **fields: Any) -> None:
        self.records[name] = {**fields, "stamp_version": STAMP_VERSION, "at": now()}
        write_json(self.path, self.records)

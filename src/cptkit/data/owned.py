"""Which prepared folders cptkit may write into: never one holding files it did not write.

A folder is cptkit's when its `manifest.json` is one `cptkit prepare` wrote (any status: a run starts
by writing one that says `incomplete`, so an interrupted run's folder is still recognised), or when all
it holds is what a run writes before that manifest: the token store (`store/<source>/<key>.*`,
`store/file_hashes.json`) and temporaries (`.writing-*`). Anything else (a user's own `train/` or
`heldout/`, another tool's manifest) is refused before any work, so nothing of it is deleted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cptkit.data.cache import FILE_HASHES, STORE_DIR
from cptkit.data.manifest import FORMAT_VERSION, MANIFEST
from cptkit.errors import CptkitError

INCOMPLETE = "incomplete"
# <key>.arrow, <key>.json, <key>.failed.json, self_replay-<key>.jsonl/.json, and their temporaries
_CACHE_ENTRY = re.compile(r"^(self_replay-)?[0-9a-f]{8,}\.(arrow|json|failed\.json|jsonl)(\.[\w.-]+)?$")


def is_cptkit_manifest(data: Any) -> bool:
    """A manifest `cptkit prepare` wrote: a JSON object with its format version and a status."""
    return isinstance(data, dict) and "format_version" in data and "status" in data


def check_writable(out: Path) -> None:
    """Refuse a prepare into `out` when it holds files cptkit did not write; say what is there."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CptkitError(f"data.output_dir: {out} is a file, not a folder; choose a folder")
    manifest = out / MANIFEST
    if manifest.exists():
        try:
            ours = is_cptkit_manifest(json.loads(manifest.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            ours = False
        if ours:
            return
        foreign = [MANIFEST]
    else:
        foreign = [_describe(p) for p in sorted(out.iterdir()) if not _written_before_manifest(p)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CptkitError(
            f"data.output_dir: {out} holds files that cptkit prepare did not write ({shown}); cptkit would "
            "write over them. Choose an empty or new folder for data.output_dir, or move those files away"
        )


def mark_started(out: Path) -> None:
    """Claim `out` for this preparation before writing anything else into it: a manifest saying
    `incomplete`, unless a manifest of an earlier preparation is there (the write replaces it)."""
    if not (out / MANIFEST).exists():
        mark_incomplete(out)


def mark_incomplete(out: Path) -> None:
    """A manifest that says `out` is cptkit's, being written, and not to be read as a dataset."""
    from cptkit.outputs import now, write_json

    write_json(out / MANIFEST, {"status": INCOMPLETE, "format_version": FORMAT_VERSION, "started": now()})


def _written_before_manifest(path: Path) -> bool:
    if path.name.startswith(".writing-") and path.is_dir():
        return True
    if path.name != STORE_DIR or not path.is_dir():
        return False
    for entry in path.iterdir():
        if entry.name.startswith(FILE_HASHES):  # and its temporary
            continue
        if not entry.is_dir() or not all(_CACHE_ENTRY.match(f.name) for f in entry.iterdir()):
            return False
    return True


def _describe(path: Path) -> str:
    if not path.is_dir():
        return path.name
    count = sum(1 for p in path.rglob("*") if p.is_file())
    return f"{path.name}/ ({count} file{'' if count == 1 else 's'})"

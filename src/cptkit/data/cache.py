"""The token store of a prepared folder (`<out>/store/<source>/<key>.arrow|.json`): what is left from
interrupted runs, and the entries no source of a config uses any more.

The store is what tokenization writes and what training reads in place (`train/index.json` lists the
store files its rows come from), so it is kept after the prepared folder is written."""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

STORE_DIR = "store"  # inside the prepared folder
FILE_HASHES = "file_hashes.json"  # inside the store: input sha256 by (size, mtime)


LEFTOVER_AGE_S = 600  # a temporary untouched this long was left by a killed run


def clear_leftovers(cache_dir: Path, min_age_s: float = LEFTOVER_AGE_S) -> None:
    """Remove the half-written entries of interrupted runs. One still being written (by another machine
    sharing the cache, whose writer touches it at every batch) is younger than `min_age_s` and stays."""
    now = time.time()
    for leftover in cache_dir.glob("*/*.tmp"):
        try:
            if now - leftover.stat().st_mtime >= min_age_s:
                leftover.unlink(missing_ok=True)
        except FileNotFoundError:  # its writer finished or removed it meanwhile
            pass


def prune_cache(cache_dir: Path, keep: dict[str, set[str]]) -> tuple[int, int]:
    """Delete store entries that no source of this config uses (another tokenizer, filters, changed or
    removed files, removed sources); `keep` holds each source's shard keys. Returns (entries removed,
    bytes freed)."""
    removed = freed = 0
    if not cache_dir.is_dir():
        return 0, 0
    for folder in (p for p in cache_dir.iterdir() if p.is_dir()):
        for entry in list(folder.iterdir()):
            key = entry.name.split(".", 1)[0]
            if folder.name in keep and key in keep[folder.name]:
                continue
            freed += entry.stat().st_size
            removed += entry.suffix == ".arrow"
            entry.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()
    log.info(
        "store: removed %d unused entr%s, %.1f MB freed", removed, "y" if removed == 1 else "ies", freed / 1e6
    )
    return removed, freed

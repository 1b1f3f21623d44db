"""Content hashes of input files, computed as streams and remembered by (size, mtime).

The manifest records each input's sha256; the tokenization cache is keyed on them, so a rerun on
unchanged inputs must not re-read hundreds of GB just to learn that nothing changed. A file that cannot
be read has no hash (None): its shard is keyed on that, and reading it counts it as an unreadable file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from cptkit.outputs import temporary_beside

log = logging.getLogger(__name__)

_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


class HashCache:
    """sha256 of files, reused while a file's size and modification time are unchanged."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries: dict[str, list] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, file: Path) -> str:
        st = file.stat()
        key = os.path.realpath(file)
        entry = self.entries.get(key)
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        digest = sha256_file(file)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_beside(self.path)  # its own: machines share the store
        tmp.write_text(json.dumps(self.entries), encoding="utf-8")
        tmp.replace(self.path)


def digest(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (cache keys, run fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def hash_files(files: list[Path], cache_file: Path) -> dict[Path, str | None]:
    """sha256 of every file (streamed, with a progress bar for large inputs; remembered in `cache_file`
    by size and mtime between runs); None for a file that cannot be read (no permission, an I/O error),
    which the readers then count as unreadable, named, instead of the whole run stopping here."""
    from tqdm.auto import tqdm

    cache = HashCache(cache_file)
    sizes = {p: file_size(p) for p in files}
    sha: dict[Path, str | None] = {}
    total = sum(sizes.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing inputs", disable=total < 64 << 20) as bar:
        for p in files:
            try:
                sha[p] = cache.sha256(p)
            except OSError as e:
                log.debug("%s cannot be hashed (%s): reading it will count it as unreadable", p, e)
                sha[p] = None
            bar.update(sizes[p])
    cache.save()
    return sha


def file_size(path: Path) -> int:
    """The file's size, 0 when it is gone or unreachable since it was listed (reading it counts it)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0

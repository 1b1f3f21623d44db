"""Exact deduplication: a document whose normalised text was already seen is dropped and counted.

Documents are compared by a 128-bit hash of their normalised text, across all sources in config order
(the first occurrence wins), so a text never lands in both one source's training rows and another's
held-out set.

Memory: the hashes of the documents kept so far, 16 bytes each, in one sorted array; while a source is
checked, about 60 bytes more for each of them and of the source's documents (the merge sort).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cptkit.data.steps import SourceDocs


def hash_keys(hashes: np.ndarray | Sequence[bytes]) -> np.ndarray:
    """16-byte hashes (an (n, 16) uint8 array, or bytes objects of 16 bytes) as (n, 2) uint64 keys."""
    if not isinstance(hashes, np.ndarray):
        hashes = list(hashes)
        if any(len(h) != 16 for h in hashes):
            raise ValueError("exact dedup compares 16-byte hashes")
        hashes = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, 16)
    return np.ascontiguousarray(hashes, dtype=np.uint8).view("<u8").reshape(-1, 2)


class Deduper:
    """Corpus step: keeps the documents whose text no earlier document (of this or an earlier source) had."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.seen = np.empty((0, 2), dtype=np.uint64)  # the kept hashes, sorted, each once

    def keep_mask(self, hashes: np.ndarray | Sequence[bytes]) -> np.ndarray:
        """True for each document seen for the first time (all True when dedup is off)."""
        keys = hash_keys(hashes)
        if not self.enabled:
            return np.ones(len(keys), dtype=bool)
        before = len(self.seen)
        both = np.concatenate([self.seen, keys])
        order = np.lexsort((both[:, 1], both[:, 0]))  # stable: among equal hashes the earliest comes first
        both = both[order]
        first = np.ones(len(both), dtype=bool)
        first[1:] = (both[1:] != both[:-1]).any(axis=1)
        self.seen = both[first]
        new = order[first]
        keep = np.zeros(len(keys), dtype=bool)
        keep[new[new >= before] - before] = True
        return keep

    def select(self, source: SourceDocs, docs: np.ndarray) -> np.ndarray:
        """The documents of `docs` seen for the first time."""
        return docs[self.keep_mask(source.hashes[docs])]

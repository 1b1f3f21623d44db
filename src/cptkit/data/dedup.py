"""Exact deduplication: a document whose normalised text was already seen is dropped and counted.

Documents are compared by a 128-bit hash of their normalised text, across all sources in config order
(the first occurrence wins), so a text never lands in both one source's training rows and another's
held-out set.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from cptkit.data.steps import SourceDocs


class Deduper:
    """Corpus step: keeps the documents whose text no earlier document (of this or an earlier source) had."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.seen: set[bytes] = set()

    def keep_mask(self, hashes: Iterable[bytes]) -> np.ndarray:
        """True for each document seen for the first time (all True when dedup is off)."""
        hashes = list(hashes)
        if not self.enabled:
            return np.ones(len(hashes), dtype=bool)
        keep = np.zeros(len(hashes), dtype=bool)
        seen = self.seen
        for i, h in enumerate(hashes):
            if h not in seen:
                seen.add(h)
                keep[i] = True
        return keep

    def select(self, source: SourceDocs, docs: np.ndarray) -> np.ndarray:
        """The documents of `docs` seen for the first time."""
        hashes = source.hashes
        return docs[self.keep_mask(hashes[i] for i in docs)]

"""The held-out split: which documents of a source are kept for evaluation instead of training.

A document is held out when a seeded hash of its content falls below `fraction`, so the choice does
not depend on file order or on the other documents (adding files does not reshuffle the split).
When more than `max_documents` qualify, those with the smallest hashes are kept. A source of two
or more documents holds out at least one (an evaluation set is never silently empty) and keeps at
least one for training, unless it trains nothing (weight 0: a held-out-only source).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from cptkit.data.steps import SourceDocs


def heldout_mask(
    hashes: list[bytes], fraction: float, max_documents: int | None, seed: int, train_needed: bool = True
) -> np.ndarray:
    """True for each held-out document (`train_needed=False`: a held-out-only source may give all)."""
    n = len(hashes)
    if n <= int(train_needed) or fraction <= 0:
        return np.zeros(n, dtype=bool)
    key = seed.to_bytes(8, "little", signed=True)
    scores = np.fromiter(
        (int.from_bytes(hashlib.blake2b(h, digest_size=8, key=key).digest(), "little") for h in hashes),
        dtype=np.uint64,
        count=n,
    )
    if fraction >= 1:
        chosen = np.arange(n)
    else:
        chosen = np.flatnonzero(scores < np.uint64(int(fraction * 2.0**64)))
    if len(chosen) == 0:
        chosen = np.array([int(np.argmin(scores))])
    most = n - 1 if train_needed else n
    cap = most if max_documents is None else min(max_documents, most)
    if len(chosen) > cap:
        chosen = chosen[np.argsort(scores[chosen], kind="stable")[:cap]]
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return mask


@dataclass
class HeldoutSplit:
    """Corpus step: selects the documents of a source held out for evaluation (`data.heldout_*`; a
    source's own `heldout_fraction` wins; a weight-0 source without one is held out whole, up to the cap)."""

    fraction: float
    max_documents: int | None
    seed: int

    def select(self, source: SourceDocs, docs: np.ndarray) -> np.ndarray:
        src = source.config
        fraction = self.fraction if src.heldout_fraction is None else src.heldout_fraction
        if src.weight == 0 and src.heldout_fraction is None:
            fraction = 1.0  # a weight-0 source is there to be evaluated on
        hashes = source.hashes
        mask = heldout_mask(
            [hashes[i] for i in docs], fraction, self.max_documents, self.seed, train_needed=src.weight > 0
        )
        return docs[mask]

"""The held-out split: which documents of a source are kept for evaluation instead of training.

A document is held out when a seeded hash of its content falls below `fraction`, so the choice does
not depend on file order or on the other documents (adding files does not reshuffle the split).
When more than `max_documents` qualify, those with the smallest hashes are kept. A source of two
or more documents holds out at least one (an evaluation set is never silently empty) and keeps at
least one for training.
"""

from __future__ import annotations

import hashlib

import numpy as np


def heldout_mask(hashes: list[bytes], fraction: float, max_documents: int | None, seed: int) -> np.ndarray:
    """True for each held-out document."""
    n = len(hashes)
    if n <= 1 or fraction <= 0:
        return np.zeros(n, dtype=bool)
    key = seed.to_bytes(8, "little", signed=True)
    scores = np.fromiter(
        (int.from_bytes(hashlib.blake2b(h, digest_size=8, key=key).digest(), "little") for h in hashes),
        dtype=np.uint64,
        count=n,
    )
    chosen = np.flatnonzero(scores < np.uint64(min(fraction, 1.0) * 2.0**64 - 1))
    if len(chosen) == 0:
        chosen = np.array([int(np.argmin(scores))])
    cap = n - 1 if max_documents is None else min(max_documents, n - 1)
    if len(chosen) > cap:
        chosen = chosen[np.argsort(scores[chosen], kind="stable")[:cap]]
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return mask

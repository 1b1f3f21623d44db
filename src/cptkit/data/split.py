"""The held-out split: which documents of a source are kept for evaluation instead of training.

Each document gets a seeded hash of its content; the split takes documents in the order of their
hashes, so the choice does not depend on file order or on the other documents (adding files does not
reshuffle the split). It takes those whose hash falls below `fraction`, and more where that is fewer
than the floor (`Floor`: enough documents and tokens for a before/after comparison to carry a
verdict), capped by `max_documents`. A source of two or more documents holds out at least one (an
evaluation set is never silently empty) and keeps at least one for training, unless it trains nothing
(weight 0: a held-out-only source); the floor never takes more than a fifth of a source that trains (of
its documents or of its tokens: a corpus of a few long documents keeps most of them for training). A fraction of 0 holds nothing out, floor or not.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cptkit.data.steps import SourceDocs

log = logging.getLogger(__name__)
FLOOR_SHARE = 0.2  # the most of a training source's documents, or tokens, the floor may hold out


@dataclass(frozen=True)
class Floor:
    """The least a held-out set should hold: documents and tokens (0: no floor)."""

    documents: int = 0
    tokens: int = 0

    def met_by(self, documents: int, tokens: int) -> bool:
        return documents >= self.documents and tokens >= self.tokens

    def __str__(self) -> str:
        return f"{self.documents:,} documents and {self.tokens:,} tokens"


def heldout_mask(
    hashes: Sequence[bytes] | np.ndarray,
    fraction: float,
    max_documents: int | None,
    seed: int,
    train_needed: bool = True,
    tokens: np.ndarray | None = None,
    floor: Floor = Floor(),
) -> np.ndarray:
    """True for each held-out document (`train_needed=False`: a held-out-only source may give all).
    `hashes`: each document's 16-byte hash (bytes, or the rows of an (n, 16) uint8 array). `tokens` (each
    document's, needed for a token floor) and `floor` raise the count `fraction` gives.

    Memory: a 64-bit score and its rank per document (16 bytes), no Python object kept per document."""
    n = len(hashes)
    if n <= int(train_needed) or fraction <= 0:
        return np.zeros(n, dtype=bool)
    key = seed.to_bytes(8, "little", signed=True)
    scores = np.fromiter(
        (int.from_bytes(hashlib.blake2b(h, digest_size=8, key=key).digest(), "little") for h in hashes),
        dtype=np.uint64,
        count=n,
    )
    order = np.argsort(scores, kind="stable")
    if fraction >= 1:
        count = n
    else:
        count = max(int(np.count_nonzero(scores < np.uint64(int(fraction * 2.0**64)))), 1)
    if floor.documents or floor.tokens:
        count = max(count, _floor_count(order, tokens, floor, train_needed))
    most = n - 1 if train_needed else n
    count = min(count, most if max_documents is None else min(max_documents, most))
    mask = np.zeros(n, dtype=bool)
    mask[order[:count]] = True
    return mask


def _floor_count(order: np.ndarray, tokens: np.ndarray | None, floor: Floor, train_needed: bool) -> int:
    """How many documents, taken in `order`, meet the floor: its documents, then more until its tokens
    are reached; for a source that trains, never more than a fifth of its documents or of its tokens."""
    n = len(order)
    count = floor.documents
    cumulative = np.cumsum(np.asarray(tokens if tokens is not None else np.zeros(n), np.int64)[order])
    if floor.tokens:
        count = max(count, int(np.searchsorted(cumulative, floor.tokens, side="left")) + 1)
    if train_needed:
        fifth_tokens = int(np.searchsorted(cumulative, cumulative[-1] * FLOOR_SHARE, side="right"))
        count = min(count, int(n * FLOOR_SHARE), fifth_tokens)
    return min(count, n)


@dataclass
class HeldoutSplit:
    """Corpus step: selects the documents of a source held out for evaluation (`data.heldout_*`; a
    source's own `heldout_fraction`, `heldout_min_documents` and `heldout_min_tokens` win; a weight-0
    source without a fraction is held out whole, up to the cap)."""

    fraction: float
    max_documents: int | None
    seed: int
    floor: Floor = Floor()

    def fraction_for(self, src: Any) -> float:
        if src.heldout_fraction is not None:
            return src.heldout_fraction
        return 1.0 if src.weight == 0 else self.fraction  # a weight-0 source is there to be evaluated on

    def floor_for(self, src: Any) -> Floor:
        documents, tokens = src.heldout_min_documents, src.heldout_min_tokens
        return Floor(
            self.floor.documents if documents is None else documents,
            self.floor.tokens if tokens is None else tokens,
        )

    def select(self, source: SourceDocs, docs: np.ndarray) -> np.ndarray:
        src = source.config
        floor = self.floor_for(src)
        mask = heldout_mask(
            source.hashes[docs],
            self.fraction_for(src),
            self.max_documents,
            self.seed,
            train_needed=src.weight > 0,
            tokens=source.lengths[docs] if floor.documents or floor.tokens else None,
            floor=floor,
        )
        return docs[mask]

    def floor_report(
        self, index: int, src: Any, kept: int, documents: int, tokens: int
    ) -> dict[str, Any] | None:
        """The floor of source `index` (`kept` documents after dedup) against what its held-out set holds;
        None where it holds nothing out on purpose (fraction 0). A floor not met is logged as a warning
        that says why and what to do."""
        floor = self.floor_for(src)
        if self.fraction_for(src) <= 0:
            return None
        met = floor.met_by(documents, tokens)
        if not met:
            log.warning(
                "data.sources[%d] (%s): the held-out set holds %s documents and %s tokens, below the floor "
                "of %s (data.heldout_min_documents, data.heldout_min_tokens) because %s; a before/after "
                "comparison on it carries a wide interval. Add documents to the source or lower the floor.",
                index,
                src.name,
                f"{documents:,}",
                f"{tokens:,}",
                floor,
                self._why_short(src, kept, documents),
            )
        return {"min_documents": floor.documents, "min_tokens": floor.tokens, "met": met}

    def _why_short(self, src: Any, kept: int, documents: int) -> str:
        if self.max_documents is not None and documents >= self.max_documents:
            return f"data.heldout_max_documents ({self.max_documents}) caps it"
        if src.weight > 0:
            return f"the floor takes at most a fifth of a source that trains ({kept:,} documents)"
        return f"the source has only {kept:,} documents"

"""How sure a before/after comparison is: a paired bootstrap over documents of the change of perplexity.

Held-out sets are samples of documents, so a perplexity measured on them moves with the sample: a 0.5%
rise on 40 documents may be noise, the same rise on 4000 may not. Resampling the documents with
replacement (the same resample for both models: the comparison is paired, so what both models find
hard cancels out) and recomputing the token-weighted loss of each model gives the spread of the change
that another sample of the same size would show. The change of perplexity is exp(loss after - loss
before) - 1: perplexity is exp(loss), so that is after / before - 1, as a fraction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000  # eval.bootstrap's default, and what the training-time budget check uses
LEVEL = 0.95
SEED = 0  # fixed, so the same numbers give the same interval every time
MIN_DOCUMENTS = 2  # one document resampled is always itself: no interval, not a certain one
_CELLS_PER_CHUNK = 4_000_000  # resamples x documents drawn at once, so memory stays bounded


@dataclass(frozen=True)
class Interval:
    """A `level` interval of the perplexity change (fractions: -0.05 is 5% lower)."""

    low: float
    high: float
    level: float = LEVEL
    resamples: int = RESAMPLES

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_list(self) -> list[float]:
        return [self.low, self.high]

    def __iter__(self):  # low, high = interval
        return iter((self.low, self.high))


def perplexity_change_interval(
    nats_before: Sequence[float],
    tokens_before: Sequence[int],
    nats_after: Sequence[float],
    tokens_after: Sequence[int],
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> Interval | None:
    """The paired bootstrap interval of the perplexity change from `before` to `after`, given each
    document's summed nats and predicted tokens under both models (same documents, same order).

    None when there is nothing to resample (`resamples` 0, fewer than MIN_DOCUMENTS documents with a
    predicted token). Raises ValueError when the two models were not scored on the same documents."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (nats_before, tokens_before, nats_after, tokens_after)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError("a paired bootstrap needs per-document numbers of both models on the same documents")
    if not 0 < level < 1:
        raise ValueError(f"level {level} must be in (0, 1)")
    scored = (arrays[1] > 0) | (arrays[3] > 0)
    nb, tb, na, ta = (a[scored] for a in arrays)
    if resamples <= 0 or len(nb) < MIN_DOCUMENTS:
        return None
    changes = _resampled_changes(nb, tb, na, ta, resamples, np.random.default_rng(seed))
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(changes, [tail, 100 - tail])
    return Interval(float(low), float(high), level, resamples)


def _resampled_changes(
    nb: np.ndarray, tb: np.ndarray, na: np.ndarray, ta: np.ndarray, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """exp(loss after - loss before) - 1 on each of `resamples` resamples of the documents."""
    n = len(nb)
    per_chunk = max(_CELLS_PER_CHUNK // n, 1)
    out = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, per_chunk):
        stop = min(start + per_chunk, resamples)
        picks = rng.integers(0, n, size=(stop - start, n))
        with np.errstate(divide="ignore", invalid="ignore"):  # a resample with no token: nan, skipped
            before = nb[picks].sum(axis=1) / tb[picks].sum(axis=1)
            after = na[picks].sum(axis=1) / ta[picks].sum(axis=1)
        out[start:stop] = np.expm1(after - before)
    return out


def pooled_change_interval(
    before: Sequence[dict[str, Sequence[float]]],
    after: Sequence[dict[str, Sequence[float]]],
    resamples: int = RESAMPLES,
) -> Interval | None:
    """The interval over the documents of several sets taken together (the sets of one role): each
    argument lists, per set in the same order, `{"doc_nats": [...], "doc_tokens": [...]}`."""
    return perplexity_change_interval(
        _joined(before, "doc_nats"),
        _joined(before, "doc_tokens"),
        _joined(after, "doc_nats"),
        _joined(after, "doc_tokens"),
        resamples,
    )


def _joined(parts: Sequence[dict[str, Sequence[float]]], key: str) -> list[float]:
    return [x for part in parts for x in part[key]]

"""Best-fit-decreasing packing of segments into rows of a fixed capacity, all at once or window by window.

Segments are placed longest first, each into the open row with the least room that still fits it
(a new row when none does). Rows stay unpadded; position_ids restart per segment, so no token
attends across a segment boundary during training. Used for training rows by `cptkit prepare` and
for held-out documents by eval.

`best_fit_pack` holds Python lists of every segment it packs (about 70 bytes a segment), so
`pack_windows` packs a large corpus in windows: the segments are shuffled with the seeded generator,
cut into windows of at most `window` segments, and each window is packed on its own. A window is a
random sample of the corpus, so its rows fill about as well as rows packed from everything at once
(`compare_packing` measures the difference).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

_SHIFT = 32


def best_fit_pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group segment indices into rows whose lengths sum to at most `capacity` (best-fit decreasing).

    Rows are returned in the order they were opened; indices within a row in the order placed."""
    lengths = [int(n) for n in lengths]
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(
            f"a segment of {too_long[0]} tokens does not fit in rows of {capacity}; split it first"
        )
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable") if lengths else []
    rows: list[list[int]] = []
    # open rows as sorted keys (room << 32 | row): the first key >= need is the tightest fit
    room_keys: list[int] = []
    mask = (1 << _SHIFT) - 1
    for i in order:
        need = lengths[i]
        if need <= 0:
            continue
        pos = bisect_left(room_keys, need << _SHIFT)
        if pos < len(room_keys):
            key = room_keys.pop(pos)
            row, room = key & mask, key >> _SHIFT
        else:
            row, room = len(rows), capacity
            rows.append([])
        rows[row].append(int(i))
        room -= need
        if room > 0:
            insort(room_keys, room << _SHIFT | row)
    return rows


class PackedWindow(NamedTuple):
    """The rows packed from one window, in their shuffled order: `segments` holds the indices (into the
    lengths given to `pack_windows`) of their segments, row after row; `row_sizes` how many segments
    each row has."""

    segments: np.ndarray
    row_sizes: np.ndarray


def pack_windows(
    lengths: np.ndarray, capacity: int, window: int, rng: np.random.Generator
) -> Iterator[PackedWindow]:
    """Pack segments of `lengths` tokens into rows of at most `capacity`, window by window, rows shuffled.

    When they are at most `window` segments, they are packed best-fit all at once and the rows shuffled
    (one `rng.permutation`). Otherwise the segments are shuffled (`rng.permutation`), cut into
    ceil(n / window) windows of nearly equal size (at most `window` each, so the last window is not a
    small remainder that packs badly), the windows are put in a shuffled order (`rng.permutation`), and
    each window in that order is packed best-fit and its rows shuffled. Every segment lands in exactly
    one row; the same generator state gives the same rows."""
    lengths = np.asarray(lengths)
    n = len(lengths)
    if n <= window:
        yield _pack_window(np.arange(n), lengths, capacity, rng)
        return
    count = -(-n // window)
    windows = np.array_split(rng.permutation(n), count)
    for w in rng.permutation(count):
        yield _pack_window(windows[w], lengths, capacity, rng)


def _pack_window(
    segments: np.ndarray, lengths: np.ndarray, capacity: int, rng: np.random.Generator
) -> PackedWindow:
    rows = best_fit_pack(lengths[segments].tolist(), capacity)
    order = rng.permutation(len(rows))
    local = np.fromiter((i for r in order for i in rows[r]), dtype=np.int64, count=len(segments))
    sizes = np.fromiter((len(rows[r]) for r in order), dtype=np.int64, count=len(rows))
    return PackedWindow(segments[local], sizes)


def count_windows(num_segments: int, window: int) -> int:
    """How many windows `pack_windows` packs `num_segments` segments in."""
    return 1 if num_segments <= window else -(-num_segments // window)


class PackingComparison(NamedTuple):
    """Packing efficiency (tokens / (rows * capacity)) of one set of segments, windowed and all at once."""

    windowed: float
    all_at_once: float
    windows: int

    @property
    def loss(self) -> float:
        """What windowing costs, as a fraction of the all-at-once efficiency."""
        return 1 - self.windowed / self.all_at_once if self.all_at_once else 0.0


def packing_efficiency(lengths: np.ndarray, capacity: int, window: int, seed: int = 0) -> float:
    """tokens / (rows * capacity) of `pack_windows` on segments of `lengths` tokens (1.0: no padding)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = sum(len(w.row_sizes) for w in pack_windows(lengths, capacity, window, np.random.default_rng(seed)))
    return float(lengths.sum() / (rows * capacity)) if rows else 0.0


def compare_packing(lengths: np.ndarray, capacity: int, window: int, seed: int = 0) -> PackingComparison:
    """The packing efficiency of segments of `lengths` tokens in windows of `window` segments and all at
    once (one window of them all)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return PackingComparison(
        windowed=packing_efficiency(lengths, capacity, window, seed),
        all_at_once=packing_efficiency(lengths, capacity, max(len(lengths), 1), seed),
        windows=count_windows(len(lengths), window),
    )

"""Best-fit-decreasing packing of segments into rows of a fixed capacity.

Segments are placed longest first, each into the open row with the least room that still fits it
(a new row when none does). Rows stay unpadded; position_ids restart per segment, so no token
attends across a segment boundary during training. Used for training rows by `cptkit prepare` and
for held-out documents by eval.
"""

from __future__ import annotations

from bisect import bisect_left, insort

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

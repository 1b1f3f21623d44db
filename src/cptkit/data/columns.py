"""Reading some rows of a memory-mapped store column without reading the column.

A source's store shards open as one table whose columns are chunked (a chunk per record batch of every
shard file). `pyarrow.ChunkedArray.take` joins all the chunks into one array before it takes (pyarrow
15-26): for `text` or `input_ids`, a copy of the whole source in memory. Even `Array.take` on one
chunk of strings reads every value of the chunk. `take_rows` slices the runs of consecutive rows asked
for (zero-copy views of the mapped file) and joins the slices, so only the rows taken are read.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def take_rows(column: pa.ChunkedArray, rows: np.ndarray) -> pa.Array:
    """`column[rows]` (indices into the whole column, in any order, repeats allowed) as one array."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return pa.array([], column.type)
    if rows.min() < 0 or rows.max() >= len(column):
        bad = rows.max() if rows.max() >= len(column) else rows.min()
        raise IndexError(f"row {bad} of a column of {len(column)}")
    wanted, where = np.unique(rows, return_inverse=True)  # ascending, each once
    bounds = np.cumsum([0, *(len(chunk) for chunk in column.chunks)], dtype=np.int64)
    breaks = np.flatnonzero(np.diff(wanted) != 1) + 1  # where a run of consecutive rows ends
    parts = []
    for run in np.split(wanted, breaks):
        first, last = int(run[0]), int(run[-1])
        c = int(np.searchsorted(bounds, first, side="right")) - 1
        while first <= last:  # a run that crosses a chunk's end continues in the next one
            end = min(last + 1, int(bounds[c + 1]))
            parts.append(column.chunk(c).slice(first - int(bounds[c]), end - first))
            first, c = end, c + 1
    taken = pa.concat_arrays(parts)
    if len(wanted) == len(rows) and np.array_equal(wanted, rows):
        return taken
    return taken.take(pa.array(where.ravel()))  # the small copy, back in the order asked for

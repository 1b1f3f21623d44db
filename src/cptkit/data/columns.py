"""Reading some rows of a memory-mapped store column without copying the column.

A source's store shards open as one table whose columns are chunked (a chunk per record batch of every
shard file). `pyarrow.ChunkedArray.take` joins all the chunks into one array before it takes (pyarrow
15-26), which for `text` or `input_ids` is a copy of the whole source into memory; `take_rows` takes from
each chunk the rows it holds, so only the rows taken are read and copied.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def take_rows(column: pa.ChunkedArray, rows: np.ndarray) -> pa.Array:
    """`column[rows]` (indices into the whole column, in any order) as one array, read chunk by chunk."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(column)):
        raise IndexError(f"row {rows.max() if rows.max() >= len(column) else rows.min()} of {len(column)}")
    if column.num_chunks == 1:
        return column.chunk(0).take(pa.array(rows))
    bounds = np.cumsum([0, *(len(chunk) for chunk in column.chunks)], dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    ascending = rows[order]
    cuts = np.searchsorted(ascending, bounds)
    parts = [
        chunk.take(pa.array(ascending[cuts[i] : cuts[i + 1]] - bounds[i]))
        for i, chunk in enumerate(column.chunks)
        if cuts[i + 1] > cuts[i]
    ]
    taken = pa.concat_arrays(parts) if parts else pa.array([], column.type)
    if np.any(order != np.arange(len(order))):  # back to the order asked for
        taken = taken.take(pa.array(np.argsort(order)))
    return taken

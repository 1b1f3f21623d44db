"""`take_rows`: rows of a chunked column, in the order asked, read chunk by chunk (what
`ChunkedArray.take` gives, without joining the chunks into one copy first)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cptkit.data.columns import take_rows


def chunked(kind: str) -> pa.ChunkedArray:
    rng = np.random.default_rng(0)
    lists = [rng.integers(0, 99, rng.integers(0, 6)).tolist() for _ in range(40)]
    values = lists if kind == "ids" else [f"document {i}" * (i % 3) for i in range(40)]
    typ = pa.list_(pa.int32()) if kind == "ids" else pa.large_string()
    cuts = [0, 7, 7, 19, 33, 40]  # an empty chunk among them
    return pa.chunked_array([pa.array(values[a:b], typ) for a, b in zip(cuts, cuts[1:], strict=False)], typ)


@pytest.mark.parametrize("kind", ["ids", "text"])
@pytest.mark.parametrize(
    "rows", [[], [0], [39], [3, 8, 20, 33, 39], [39, 0, 18, 18, 7, 6], list(range(40))[::-1]]
)
def test_take_rows_is_take(kind, rows):
    column, rows = chunked(kind), np.array(rows, dtype=np.int64)
    assert take_rows(column, rows).to_pylist() == column.take(pa.array(rows)).to_pylist()


def test_take_rows_one_chunk_and_out_of_range():
    column = pa.chunked_array([pa.array(["a", "b", "c"])])
    assert take_rows(column, np.array([2, 0])).to_pylist() == ["c", "a"]
    with pytest.raises(IndexError):
        take_rows(chunked("text"), np.array([40]))
    with pytest.raises(IndexError):
        take_rows(chunked("text"), np.array([-1]))


def test_take_rows_copies_only_the_rows_taken():
    """From a 64-chunk column of 8 MiB, two rows cost their bytes, not the column's."""
    column = pa.chunked_array([pa.array(["x" * 2048] * 64, pa.large_string()) for _ in range(64)])
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    default = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        taken = take_rows(column, np.array([5, 4000]))
        assert taken.to_pylist() == ["x" * 2048] * 2
        del taken
    finally:
        pa.set_memory_pool(default)
    assert 0 < pool.max_memory() < 64 << 10, pool.max_memory()

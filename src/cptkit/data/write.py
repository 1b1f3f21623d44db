"""Writing the prepared folder: Arrow datasets (`datasets.save_to_disk`) for training and held-out rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from cptkit.data.assemble import HeldOut, Rows

_MAX_CHUNK_TOKENS = 1 << 30  # list<int32> offsets are 32-bit: keep each Arrow chunk well under that


def _list_chunks(values: np.ndarray, offsets: np.ndarray) -> pa.ChunkedArray:
    chunks, row = [], 0
    n_rows = len(offsets) - 1
    while row < n_rows or not chunks:
        end = int(np.searchsorted(offsets, offsets[row] + _MAX_CHUNK_TOKENS, side="right")) - 1
        end = max(end, row + 1) if n_rows else 0
        local = (offsets[row : end + 1] - offsets[row]).astype(np.int32)
        chunks.append(
            pa.ListArray.from_arrays(pa.array(local), pa.array(values[offsets[row] : offsets[end]]))
        )
        row = end
    return pa.chunked_array(chunks, type=pa.list_(pa.int32()))


def _save(table: pa.Table, folder: Path) -> None:
    import datasets
    from datasets.utils import logging as ds_logging

    quiet = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # one bar per small held-out set is noise; writing takes seconds
    try:
        datasets.Dataset(table).save_to_disk(str(folder))
    finally:
        if quiet:
            ds_logging.enable_progress_bar()


def write_train(rows: Rows, folder: Path) -> None:
    """`train/`: input_ids and position_ids, int32 lists, one unpadded row each."""
    table = pa.table(
        {
            "input_ids": _list_chunks(rows.input_ids, rows.offsets),
            "position_ids": _list_chunks(rows.position_ids, rows.offsets),
        }
    )
    _save(table, folder)


def write_heldout(heldout: HeldOut, folder: Path) -> None:
    """`heldout/<source>/`: text, input_ids of the whole document, num_bytes."""
    ids = heldout.ids
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in ids])]).astype(np.int64)
    values = np.concatenate(ids).astype(np.int32) if ids else np.empty(0, np.int32)
    table = pa.table(
        {
            "text": pa.array(heldout.texts, pa.string()),
            "input_ids": _list_chunks(values, offsets),
            "num_bytes": pa.array(heldout.num_bytes, pa.int64()),
        }
    )
    _save(table, folder)

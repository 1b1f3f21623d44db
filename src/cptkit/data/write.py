"""Writing the prepared folder: Arrow datasets (`datasets.save_to_disk`) for training and held-out rows,
put in place so that a reader never sees a mix of two preparations."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from cptkit.data.assemble import Assembled, HeldOut, Rows
from cptkit.data.manifest import HELDOUT_DIR, TRAIN_DIR
from cptkit.data.owned import mark_incomplete
from cptkit.disk import FreeSpace, check_free_space, free_bytes

log = logging.getLogger(__name__)

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
    """`train/`: input_ids and position_ids, int32 lists, one unpadded row each, and source_ids, one
    int32 per packed segment of the row (the k-th is the source id of the k-th segment, the one that
    starts at the k-th position id 0).

    The rows are gathered and written a block at a time into one Arrow stream file, laid out as
    `datasets.save_to_disk` lays out a one-shard dataset (so `load_from_disk` memory-maps it), rather
    than built as one table first: memory stays at one block whatever the number of rows."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    list_of = getattr(datasets, "List", None) or datasets.Sequence  # List since datasets 4
    features = datasets.Features(
        {name: list_of(datasets.Value("int32")) for name in ("input_ids", "position_ids", "source_ids")}
    )
    schema = features.arrow_schema
    data_file = "data-00000-of-00001.arrow"
    digest = hashlib.sha256()
    with pa.OSFile(str(folder / data_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for block in rows.blocks():
            offsets = pa.array(block.row_offsets.astype(np.int32))
            writer.write_batch(
                pa.record_batch(
                    [
                        pa.ListArray.from_arrays(
                            offsets, pa.array(block.input_ids.astype(np.int32, copy=False))
                        ),
                        pa.ListArray.from_arrays(offsets, pa.array(block.position_ids)),
                        pa.ListArray.from_arrays(
                            pa.array(block.segment_offsets.astype(np.int32)), pa.array(block.source_ids)
                        ),
                    ],
                    schema=schema,
                )
            )
            digest.update(block.input_ids.tobytes())
    state = {
        "_data_files": [{"filename": data_file}],
        "_fingerprint": digest.hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    info = asdict(datasets.DatasetInfo(features=features))
    (folder / "dataset_info.json").write_text(
        json.dumps({k: info[k] for k in sorted(info)}, indent=2), encoding="utf-8"
    )


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


def dataset_bytes(result: Assembled) -> int:
    """About how many bytes the prepared folder's datasets take: int32 ids and positions, a source id per
    segment (and a 32-bit offset per row of each) for training, ids, text and sizes for the held-out sets."""
    rows = result.rows
    size = rows.num_tokens * 4 * 2 + rows.num_segments * 4 + rows.num_rows * 4 * 3
    for held in result.heldout.values():
        size += sum(len(a) for a in held.ids) * 4 + sum(held.num_bytes) + len(held.ids) * 16
    return size


def write_folder(out: Path, result: Assembled, free_space: FreeSpace = free_bytes) -> None:
    """Write train/ and heldout/ into a temporary folder, then move them in place. The old manifest is
    replaced by one saying `incomplete` first, so from then on the folder reads as unfinished (and still
    as cptkit's) until the caller writes the new one. The free space is checked first (`free_space`);
    the temporary folder is removed whatever stops the write."""
    log.info(
        "writing %s rows and %d held-out set(s) to %s", f"{result.rows.num_rows:,}", len(result.heldout), out
    )
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".writing-*"):  # left by a killed run: while we hold the folder's lock, not in use
        shutil.rmtree(stale, ignore_errors=True)
    check_free_space(
        out,
        dataset_bytes(result),
        "the prepared dataset",
        "free some space or set data.output_dir elsewhere",
        free_space,
    )
    tmp = out / f".writing-{os.getpid()}"
    try:
        write_train(result.rows, tmp / TRAIN_DIR)
        for name, held in result.heldout.items():
            write_heldout(held, tmp / HELDOUT_DIR / name)
        mark_incomplete(out)
        for part in (TRAIN_DIR, HELDOUT_DIR):
            if (out / part).exists():
                shutil.rmtree(out / part)
            (tmp / part).rename(out / part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""Writing the prepared folder: `train/` as an index into the token store (raw arrays and index.json) and
the held-out sets as Arrow datasets (`datasets.save_to_disk`), put in place so that a reader never sees a
mix of two preparations."""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from cptkit.data.assemble import Assembled, HeldOut, Rows, StoreShard
from cptkit.data.manifest import HELDOUT_DIR, TRAIN_ARRAYS, TRAIN_DIR, TRAIN_FORMAT, TRAIN_INDEX
from cptkit.data.owned import mark_incomplete
from cptkit.disk import FreeSpace, check_free_space, free_bytes

log = logging.getLogger(__name__)

_MAX_CHUNK_TOKENS = 1 << 30  # list<int32> offsets are 32-bit: keep each Arrow chunk well under that


class WrittenRows(NamedTuple):
    """What packing the rows into train/ gave: rows, segments, tokens, and the windows they were packed in."""

    rows: int
    segments: int
    tokens: int
    windows: int


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


def write_train(rows: Rows, shards: list[StoreShard], folder: Path) -> WrittenRows:
    """`train/`: the rows as an index into the token store (the contract's format 3).

    `<name>.bin` for each array of `TRAIN_ARRAYS`, raw little-endian: row_offsets (one more than the
    rows: where each row's segments start, from 0), and each segment's start in the token space, length
    and source id, row after row. `index.json` (written last) says how many rows, segments and tokens
    there are, the row length, the tokenizer fingerprint, and the store files whose input_ids values, end
    to end in the listed order, are the token space (`shards`, paths relative to the prepared folder).

    The rows are packed a window of segments at a time (`Rows.windows`) and each window is appended to
    the arrays as it is packed: memory stays at one window whatever the number of rows, and no token is
    read or copied."""
    fingerprints = {s.fingerprint for s in shards}
    if len(fingerprints) != 1 or None in fingerprints:
        raise ValueError(f"the store files name {len(fingerprints)} tokenizer fingerprints; expected one")
    folder.mkdir(parents=True, exist_ok=True)
    n_rows = n_segments = n_windows = 0
    with ExitStack() as files:
        out = {name: files.enter_context(open(folder / f"{name}.bin", "wb")) for name in TRAIN_ARRAYS}
        out["row_offsets"].write(np.zeros(1, TRAIN_ARRAYS["row_offsets"]).tobytes())
        for window in rows.windows():
            ends = n_segments + np.cumsum(window.row_sizes)
            out["row_offsets"].write(ends.astype(TRAIN_ARRAYS["row_offsets"]).tobytes())
            out["segment_starts"].write(
                window.segment_starts.astype(TRAIN_ARRAYS["segment_starts"]).tobytes()
            )
            out["segment_lengths"].write(
                window.segment_lengths.astype(TRAIN_ARRAYS["segment_lengths"]).tobytes()
            )
            out["segment_sources"].write(
                window.segment_sources.astype(TRAIN_ARRAYS["segment_sources"]).tobytes()
            )
            n_rows += len(window.row_sizes)
            n_segments += len(window.segment_lengths)
            n_windows += 1
    written = WrittenRows(rows=n_rows, segments=n_segments, tokens=rows.num_tokens, windows=n_windows)
    index = {
        "format": TRAIN_FORMAT,
        "rows": written.rows,
        "segments": written.segments,
        "tokens": written.tokens,
        "seq_length": rows.seq_length,
        "tokenizer_fingerprint": fingerprints.pop(),
        "shards": [{"path": s.path, "tokens": s.tokens, "documents": s.documents} for s in shards],
        "arrays": dict(TRAIN_ARRAYS),
    }
    (folder / TRAIN_INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
    return written


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
    """At most how many bytes the prepared folder's new files take: train/'s index (8 bytes a row offset,
    16 a segment; rows counted as many as the segments, the most they can be, since they are known only
    once packed) and the held-out sets' ids, text and sizes. The tokens themselves are not copied: the
    store holds them already."""
    segments = result.rows.num_segments
    size = 8 * (segments + 1) + 16 * segments + 4096  # the index.json too
    for held in result.heldout.values():
        size += sum(len(a) for a in held.ids) * 4 + sum(held.num_bytes) + len(held.ids) * 16
    return size


def write_folder(out: Path, result: Assembled, free_space: FreeSpace = free_bytes) -> WrittenRows:
    """Write train/ and heldout/ into a temporary folder, then move them in place; returns what packing the
    rows gave. The old manifest is replaced by one saying `incomplete` first, so from then on the folder
    reads as unfinished (and still as cptkit's) until the caller writes the new one. The free space is
    checked first (`free_space`); the temporary folder is removed whatever stops the write."""
    rows = result.rows
    log.info(
        "packing %s segments best-fit into rows of %d tokens (%d window%s), writing them and %d held-out "
        "set(s) to %s",
        f"{rows.num_segments:,}",
        rows.seq_length,
        rows.num_windows,
        "" if rows.num_windows == 1 else "s",
        len(result.heldout),
        out,
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
        written = write_train(rows, result.shards, tmp / TRAIN_DIR)
        for name, held in result.heldout.items():
            write_heldout(held, tmp / HELDOUT_DIR / name)
        mark_incomplete(out)
        for part in (TRAIN_DIR, HELDOUT_DIR):
            if (out / part).exists():
                shutil.rmtree(out / part)
            (tmp / part).rename(out / part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written

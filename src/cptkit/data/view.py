"""The training rows of a prepared folder, read from its token store: a map-style torch Dataset.

`PackedRows(folder)[i]` is row i of `train/index.json`: its segments end to end (`input_ids`), their
positions counting from 0 at each segment's start (`position_ids`) and one source id per segment
(`source_ids`), as int32 numpy arrays, what `cptkit.train.collator.PackedCollator` takes. A row is
gathered when asked for and nothing else is read, so a resumed run that skips the rows it trained on
(the Trainer skips batches of indices) reads none of them, and the rows need no copy of the corpus.

It pickles as its folder and the identity of its index: a DataLoader worker or another accelerate
process opens the store again, on its first row, and refuses an index that changed meanwhile (a
prepare into the folder a run trains on). The folder was checked when `Prepared.load` opened it (format, store files, tokenizer);
a reopening checks each store file again as it maps it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cptkit.data.store import TokenSpace, TrainIndex
from cptkit.errors import CptkitError

COLUMNS = ["input_ids", "position_ids", "source_ids"]


class PackedRows(torch.utils.data.Dataset):
    """The packed training rows of the prepared folder `folder` (rows in the order prepare shuffled)."""

    column_names = COLUMNS

    def __init__(
        self,
        folder: str | Path,
        train_dir: str = "train",
        index: TrainIndex | None = None,
        space: TokenSpace | None = None,
    ):
        self.folder, self.train_dir = Path(folder), train_dir
        self._index, self._space = index, space
        self._expected: str | None = None  # a copy's: the identity of the index its original opened

    @property
    def index(self) -> TrainIndex:
        if self._index is None:
            index = TrainIndex(self.folder, self.train_dir)
            if self._expected is not None and index.identity != self._expected:
                raise CptkitError(
                    f"{index.dir / 'index.json'} changed while a run read it (prepared again into the "
                    "folder a run trains on): the rows would not be the ones the run started with; "
                    "start the run again, and prepare into another folder while one trains"
                )
            self._index = index
        return self._index

    @property
    def space(self) -> TokenSpace:
        if self._space is None:
            self._space = TokenSpace(self.folder, self.index.shards, self.index.fingerprint)
        return self._space

    def __len__(self) -> int:
        return self.index.rows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Rows `indices` (what a DataLoader asks for one batch), their segments gathered together."""
        index, n = self.index, len(self)
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < -n or rows.max() >= n):
            bad = int(rows[(rows < -n) | (rows >= n)][0])
            raise IndexError(f"row {bad} of {n} training rows")
        rows = np.where(rows < 0, rows + n, rows)
        first, last = index.row_offsets[rows], index.row_offsets[rows + 1]
        counts = (last - first).astype(np.int64)
        # the segments of every row asked for, rows one after another
        segments = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
        lengths = index.segment_lengths[segments].astype(np.int64)
        tokens = self.space.gather_many(index.segment_starts[segments].astype(np.int64), lengths)
        seg_start = np.cumsum(lengths) - lengths  # where each segment starts in `tokens`
        positions = (np.arange(len(tokens), dtype=np.int64) - np.repeat(seg_start, lengths)).astype(np.int32)
        sources = index.segment_sources[segments].astype(np.int32)
        seg_bounds = np.concatenate([[0], np.cumsum(counts)])
        tok_bounds = np.concatenate([seg_start, [len(tokens)]])[seg_bounds]
        out = []
        for k in range(len(rows)):
            a, b, s, e = (
                int(tok_bounds[k]),
                int(tok_bounds[k + 1]),
                int(seg_bounds[k]),
                int(seg_bounds[k + 1]),
            )
            out.append({"input_ids": tokens[a:b], "position_ids": positions[a:b], "source_ids": sources[s:e]})
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), 256):
            yield from self.__getitems__(range(start, min(start + 256, len(self))))

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "train_dir": self.train_dir, "identity": self.index.identity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["train_dir"])
        self._expected = state.get("identity")  # a copy reads the preparation its original read, or refuses

    def __repr__(self) -> str:
        return f"PackedRows({str(self.folder)!r}, rows={len(self)})"

"""The token store as training reads it: the shard files `train/index.json` lists, memory-mapped, and the
index's arrays that say which tokens make each row.

The token space of a prepared folder is the concatenation of the `input_ids` values of the listed shard
files (`store/<source>/<key>.arrow`, Arrow IPC files), in the listed order, record batch by record batch.
A segment is a run of that space (`segment_starts`, `segment_lengths`); a row is consecutive segments
(`row_offsets`). Nothing is copied at open: each record batch's ids are a zero-copy numpy view of the
mapped file, and the index's arrays are `np.memmap`s, so a store larger than memory trains from disk.

Every check a user can act on happens when a folder opens: the index's format, each listed shard file
present, of the store format this cptkit reads, made with the index's tokenizer and holding the token
count the index lists, and each array file of the size its count implies.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cptkit.data.manifest import TRAIN_ARRAYS, TRAIN_FORMAT
from cptkit.data.manifest import TRAIN_INDEX as INDEX
from cptkit.data.shards import STORE_FORMAT as _STORE_FORMAT
from cptkit.errors import CptkitError

STORE_FORMAT = str(_STORE_FORMAT).encode()  # as the store files' schema metadata spells it
ARRAYS = tuple(TRAIN_ARRAYS)  # row_offsets first: one more than the rows; the others one per segment
PREPARE_AGAIN = "run `cptkit prepare --force` on its config to write it again"


def format_refusal(where: Path, found: Any, reads: int = TRAIN_FORMAT) -> CptkitError:
    """The refusal of a prepared folder of format `found` where this cptkit reads `reads`: an older
    one is prepared again."""
    if isinstance(found, int) and found > reads:
        return CptkitError(
            f"{where}: prepared by a newer cptkit (format {found}; this one reads format {reads}): "
            "upgrade cptkit, or run `cptkit prepare --force` with this one"
        )
    return CptkitError(f"{where}: prepared by an older cptkit (format {found}): run cptkit prepare --force")


@dataclass(frozen=True)
class ShardEntry:
    """One store file as the index lists it: `path` relative to the prepared folder."""

    path: str
    tokens: int
    documents: int


class TrainIndex:
    """`train/index.json` and its arrays (read-only `np.memmap`s): which tokens make each row."""

    def __init__(self, folder: str | Path, train_dir: str = "train"):
        self.folder = Path(folder)
        self.dir = self.folder / train_dir
        path = self.dir / INDEX
        if not path.is_file():
            raise CptkitError(f"{path}: missing (the training rows' index); {PREPARE_AGAIN}")
        try:
            raw = path.read_bytes()
            self.identity = hashlib.sha256(raw).hexdigest()[:16]  # which preparation this index is
            meta = json.loads(raw.decode("utf-8"))
            if meta.get("format") != TRAIN_FORMAT:
                raise format_refusal(path, meta.get("format"))
            self.rows, self.segments = int(meta["rows"]), int(meta["segments"])
            self.tokens, self.seq_length = int(meta["tokens"]), int(meta["seq_length"])
            self.fingerprint = str(meta["tokenizer_fingerprint"])
            self.shards = [
                ShardEntry(s["path"], int(s["tokens"]), int(s["documents"])) for s in meta["shards"]
            ]
            dtypes = {name: np.dtype(meta["arrays"][name]) for name in ARRAYS}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CptkitError(f"{path}: unreadable ({type(e).__name__}: {e}); {PREPARE_AGAIN}") from None
        # no total check against the shards: an upsampled mix repeats segments, so the rows may hold
        # more tokens than the store (each segment's bounds are checked when it is gathered)
        counts = {"row_offsets": self.rows + 1, **dict.fromkeys(ARRAYS[1:], self.segments)}
        self.arrays = {name: self._array(name, dtypes[name], counts[name]) for name in ARRAYS}
        offsets = self.arrays["row_offsets"]
        if int(offsets[0]) != 0 or int(offsets[-1]) != self.segments:
            raise CptkitError(
                f"{self.dir / 'row_offsets.bin'}: the rows' segments run from {int(offsets[0])} to "
                f"{int(offsets[-1])}, not from 0 to the {self.segments:,} segments {INDEX} lists; {PREPARE_AGAIN}"
            )

    def _array(self, name: str, dtype: np.dtype, count: int) -> np.ndarray:
        path = self.dir / f"{name}.bin"
        if dtype.kind not in "iu":
            raise CptkitError(
                f"{self.dir / INDEX}: arrays.{name} is {dtype}, not an integer type; {PREPARE_AGAIN}"
            )
        if not path.is_file():
            raise CptkitError(f"{path}: missing (listed in {self.dir / INDEX}); {PREPARE_AGAIN}")
        size, want = path.stat().st_size, count * dtype.itemsize
        if size != want:
            raise CptkitError(
                f"{path}: {size:,} bytes, but {INDEX} lists {count:,} values of {dtype.itemsize} bytes "
                f"({want:,} bytes): the file is truncated or from another preparation; {PREPARE_AGAIN}"
            )
        if count == 0:
            return np.empty(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    @property
    def row_offsets(self) -> np.ndarray:
        return self.arrays["row_offsets"]

    @property
    def segment_starts(self) -> np.ndarray:
        return self.arrays["segment_starts"]

    @property
    def segment_lengths(self) -> np.ndarray:
        return self.arrays["segment_lengths"]

    @property
    def segment_sources(self) -> np.ndarray:
        return self.arrays["segment_sources"]


class TokenSpace:
    """The listed shard files' `input_ids` values end to end, as zero-copy views of the mapped files.

    Opening reads each file's footer and record batch headers (no token) and checks it against its
    index entry; the files' descriptors are closed again, the mappings stay while the views do."""

    def __init__(self, folder: str | Path, shards: list[ShardEntry], fingerprint: str):
        self.folder = Path(folder)
        self.pieces: list[np.ndarray] = []
        starts = [0]
        for entry in shards:
            for piece in _open_shard(self.folder, entry, fingerprint):
                self.pieces.append(piece)
                starts.append(starts[-1] + len(piece))
        self.piece_starts = np.asarray(starts, dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.piece_starts[-1])

    def gather(self, start: int, length: int) -> np.ndarray:
        """Tokens `start .. start + length` of the space (a new int32 array)."""
        return self.gather_many(np.asarray([start], np.int64), np.asarray([length], np.int64))

    def gather_many(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The runs `starts[k] .. starts[k] + lengths[k]` end to end, in one new int32 array."""
        if len(starts) and (int(starts.min()) < 0 or int((starts + lengths).max()) > self.num_tokens):
            raise CptkitError(
                f"{self.folder}: a segment reaches past the {self.num_tokens:,} tokens of the store files the "
                f"index lists; {PREPARE_AGAIN}"
            )
        which = np.searchsorted(self.piece_starts, starts, side="right") - 1
        local = starts - self.piece_starts[which]
        parts = []
        for p, at, n in zip(which.tolist(), local.tolist(), lengths.tolist(), strict=True):
            while n > 0:  # a run that crosses a record batch's end continues in the next one
                piece = self.pieces[p]
                take = min(n, len(piece) - at)
                parts.append(piece[at : at + take])
                n, at, p = n - take, 0, p + 1
        return np.concatenate(parts) if parts else np.empty(0, np.int32)  # a copy: the views stay read-only


def _open_shard(folder: Path, entry: ShardEntry, fingerprint: str) -> list[np.ndarray]:
    """Each record batch's input_ids values of one store file, checked against its index entry."""
    path = folder / entry.path
    if not path.is_file():
        raise CptkitError(
            f"{path}: missing (a store file that train/{INDEX} lists; removed by hand?); {PREPARE_AGAIN}"
        )
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            meta = reader.schema.metadata or {}
            if meta.get(b"cptkit_store_format") != STORE_FORMAT:
                raise CptkitError(
                    f"{path}: not a store file of format {STORE_FORMAT.decode()} (its metadata says "
                    f"{_text(meta.get(b'cptkit_store_format'))}); {PREPARE_AGAIN}"
                )
            made_with = _text(meta.get(b"tokenizer_fingerprint"))
            if made_with != fingerprint:
                raise CptkitError(
                    f"{path}: tokenized with another tokenizer (fingerprint {made_with}) than train/{INDEX} "
                    f"lists ({fingerprint}): the store was changed after preparing; {PREPARE_AGAIN}"
                )
            column = reader.schema.get_field_index("input_ids")
            if column < 0 or reader.schema.field(column).type != pa.list_(pa.int32()):
                raise CptkitError(f"{path}: no input_ids column of int32 lists; {PREPARE_AGAIN}")
            pieces, documents = [], 0
            for i in range(reader.num_record_batches):
                ids = reader.get_batch(i).column(column)
                documents += len(ids)
                pieces.append(_int32_view(ids.flatten()))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, KeyError) as e:
        raise CptkitError(
            f"{path}: unreadable as a store file ({e}; half-written?); {PREPARE_AGAIN}"
        ) from None
    tokens = sum(len(p) for p in pieces)
    if (tokens, documents) != (entry.tokens, entry.documents):
        raise CptkitError(
            f"{path}: holds {tokens:,} tokens in {documents:,} documents, but train/{INDEX} lists "
            f"{entry.tokens:,} in {entry.documents:,}: the file was replaced after preparing; {PREPARE_AGAIN}"
        )
    return pieces


def _int32_view(values: pa.Array) -> np.ndarray:
    """The values of an int32 array as a read-only numpy view of its buffer (no copy; `to_numpy` would
    do the same but imports pandas on first use)."""
    if values.null_count:
        raise pa.ArrowInvalid(f"{values.null_count} null token id(s)")
    data = values.buffers()[1]
    if data is None:
        return np.empty(0, np.int32)
    return np.frombuffer(data, dtype=np.int32)[values.offset : values.offset + len(values)]


def _text(value: bytes | None) -> str:
    return "none" if value is None else value.decode("utf-8", "replace")

"""From the token store to training rows: caps -> dedup -> held-out split -> chunk -> mix -> pack.

Assembly works from each document's sizes and hash, read from the store's memory-mapped shard files,
never from its token values (the held-out documents' ids alone are read, to be written as held-out
sets): a segment is an offset and a length in the token space (the store shards' `input_ids` values end
to end, in the order of `Assembled.shards`), and the rows are lists of segments. So changing
`seq_length`, `chunking` between token strategies, the weights or the held-out split costs seconds, not a
re-tokenization, and the memory assembly needs grows with the documents and segments, not the tokens.

Memory per document (all sources): 16 bytes of hash for exact dedup, 8 of token count, 8 of start offset,
8 of characters, and, per source at a time, some 40 bytes of temporaries (the held-out split's scores and
the dedup merge); per segment, 16 bytes (start, length) before the mix, 20 (start, length, source)
after it and 8 more while it is packed; per window of `data.pack_window` segments, about 100 bytes a
segment of Python lists.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cptkit.config.data import DataConfig, SourceConfig
from cptkit.data.caps import leading_documents
from cptkit.data.chunk import Chunker, Segments
from cptkit.data.dedup import Deduper
from cptkit.data.mix import mix_warning, sample, sampling_factors
from cptkit.data.near_dedup import NearDeduper
from cptkit.data.pack import PackedWindow, count_windows, pack_windows
from cptkit.data.split import Floor, HeldoutSplit
from cptkit.data.steps import CorpusStep, SourceDocs
from cptkit.data.tokenize import Encoder
from cptkit.data.workers import usable_cores

log = logging.getLogger(__name__)
_CHUNK_DOCS = 1 << 16  # documents chunked at a time (their unit starts read for them alone) ...
_CHUNK_UNITS = 1 << 18  # ... and units (sentences, char chunks): about 100 bytes each while chunked


@dataclass
class StoreShard:
    """One finished shard file of the token store as assembly reads it: where it is, relative to the
    prepared folder (`store/<source>/<key>.arrow`, as train/index.json lists it), and its table,
    memory-mapped (nothing is read until used)."""

    path: str
    table: pa.Table
    file: Path | None = None  # the file itself, for `reopened` (None: the table is all there is)

    @contextmanager
    def reopened(self) -> Iterator[pa.Table]:
        """The file mapped again for a while: the pages read through it are unmapped when it closes."""
        if self.file is None:
            yield self.table
            return
        with pa.memory_map(str(self.file)) as source:
            table = pa.ipc.open_file(source).read_all()
            try:
                yield table
            finally:
                del table

    @property
    def documents(self) -> int:
        return self.table.num_rows

    @cached_property
    def tokens(self) -> int:
        """Its share of the token space: the lengths of its `input_ids` lists (offsets only) added up."""
        return int(pc.sum(pc.list_value_length(self.table.column("input_ids"))).as_py() or 0)

    @property
    def fingerprint(self) -> str | None:
        """The tokenizer fingerprint its schema metadata names (None for a file without one)."""
        value = (self.table.schema.metadata or {}).get(b"tokenizer_fingerprint")
        return value.decode() if value is not None else None


@dataclass
class HeldOut:
    """One source's held-out documents: text, whole-document ids, UTF-8 sizes."""

    texts: list[str]
    ids: list[np.ndarray]
    num_bytes: list[int]


@dataclass
class RowsWindow:
    """The rows packed from one window of segments, in their final order: each segment's start in the
    token space, length and source id, row after row, and how many segments each row holds."""

    segment_starts: np.ndarray
    segment_lengths: np.ndarray
    segment_sources: np.ndarray
    row_sizes: np.ndarray


@dataclass
class Rows:
    """The mixed segments (start in the token space, length, source id, in mix order) and how they are
    packed: best-fit into rows of `seq_length`, in windows of `window` segments, shuffled by the seeded
    generator whose state `rng_state` is. `windows()` packs them a window at a time, the same rows each
    time, so the rows are never all in memory as Python lists."""

    seg_start: np.ndarray
    seg_len: np.ndarray
    seg_source: np.ndarray
    seq_length: int
    window: int
    rng_state: dict[str, Any]

    @property
    def num_tokens(self) -> int:
        return int(self.seg_len.sum())

    @property
    def num_segments(self) -> int:
        return len(self.seg_len)

    @property
    def num_windows(self) -> int:
        return count_windows(self.num_segments, self.window)

    def windows(self) -> Iterator[RowsWindow]:
        """The packed rows, a window at a time."""
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = self.rng_state
        for packed in pack_windows(self.seg_len, self.seq_length, self.window, rng):
            yield self._window(packed)

    def _window(self, packed: PackedWindow) -> RowsWindow:
        seg = packed.segments
        return RowsWindow(
            self.seg_start[seg].astype(np.int64),
            self.seg_len[seg].astype(np.int32),
            self.seg_source[seg].astype(np.int32),
            packed.row_sizes,
        )


@dataclass
class Assembled:
    rows: Rows
    heldout: dict[str, HeldOut]
    shards: list[StoreShard]  # the token space, in order: every source's shards, config order
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_index: dict[str, int] = field(default_factory=dict)  # source name -> its id, config order
    floors: dict[str, dict[str, Any]] = field(default_factory=dict)  # source -> its held-out floor, met?


def _segments(chunker: Chunker, source: SourceDocs, lengths: np.ndarray, docs: np.ndarray) -> Segments:
    """`chunker.segments` of documents `docs` (their index in `docs`, offset, length), given the unit
    starts tokenization recorded (the `starts` column, all null when it recorded none). Documents are chunked a
    block at a time (at most `_CHUNK_DOCS` documents and `_CHUNK_UNITS` units), their unit starts read
    for them alone, so the Python objects a chunker makes per document and unit live for one block; every
    strategy tiles each document on its own, so the segments are those of one call over them all."""
    column = source.table.column("starts")
    if column.null_count == len(column):
        return chunker.segments(lengths[docs], None)
    units = np.cumsum(pc.list_value_length(column).to_numpy(zero_copy_only=False)[docs], dtype=np.int64)
    parts, lo = [], 0
    while lo < len(docs):
        before = units[lo - 1] if lo else 0
        hi = int(np.searchsorted(units, before + _CHUNK_UNITS, side="right"))
        hi = max(lo + 1, min(hi, lo + _CHUNK_DOCS))
        block = docs[lo:hi]
        doc, off, length = chunker.segments(lengths[block], _unit_starts(source, block))
        parts.append((doc + lo, off, length))
        lo = hi
    if not parts:
        return chunker.segments(lengths[docs], [])
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))


def _unit_starts(source: SourceDocs, docs: np.ndarray) -> list[np.ndarray]:
    """The recorded unit starts (sentence or char-chunk starts) of documents `docs`, one array each."""
    taken = source.take("starts", docs)
    counts = pc.list_value_length(taken).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = taken.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return np.split(flat, np.cumsum(counts)[:-1]) if len(docs) else []


def assemble(store: dict[str, list[StoreShard]], cfg: DataConfig, encoder: Encoder) -> Assembled:
    """Cap, dedup across sources, split held-out documents, chunk, mix by weight; the rows are packed
    best-fit as they are written (`Rows.windows`). `store` holds each source's shards, config order."""
    deduper = Deduper(cfg.dedup in ("exact", "near"))
    near = NearDeduper(
        cfg.near_dedup_threshold, enabled=cfg.dedup == "near", workers=cfg.num_proc or usable_cores()
    )
    floor = Floor(cfg.heldout_min_documents, cfg.heldout_min_tokens)
    split = HeldoutSplit(cfg.heldout_fraction, cfg.heldout_max_documents, cfg.seed, floor)
    try:
        return _assemble(store, cfg, encoder, deduper, near, split)
    finally:
        near.close()


def _table(shards: list[StoreShard]) -> pa.Table:
    tables = [s.table for s in shards]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _assemble(
    store: dict[str, list[StoreShard]],
    cfg: DataConfig,
    encoder: Encoder,
    exact: CorpusStep,
    near: CorpusStep,
    split: HeldoutSplit,
) -> Assembled:
    rng = np.random.default_rng(cfg.seed)
    chunker = Chunker.from_config(cfg)
    by_name: dict[str, SourceConfig] = {s.name: s for s in cfg.sources}
    seg_starts, seg_lens, stats, heldout, floors = {}, {}, {}, {}, {}
    base = 0  # where the source's tokens start in the token space
    for name, shards in store.items():
        table = _table(shards)
        src = by_name[name]
        source = SourceDocs(name, src, table, shards)
        lengths = source.lengths
        capped = leading_documents(lengths, src.max_documents, src.max_tokens)
        exact_kept = exact.select(source, np.arange(capped))
        kept = near.select(source, exact_kept)
        held = split.select(source, kept)
        train = np.setdiff1d(kept, held, assume_unique=True)
        doc_start = base + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        heldout[name] = _heldout(source, held, lengths, chunker, encoder)
        doc, off, length = _segments(chunker, source, lengths, train)
        seg_starts[name] = doc_start[train][doc] + off
        seg_lens[name] = length
        base += int(lengths.sum())
        chars = table.column("num_chars").to_numpy()
        stats[name] = {
            "documents": int(len(kept)),
            "characters": int(chars[kept].sum()),
            "tokens": int(lengths[kept].sum()),
            "capped_documents": int(table.num_rows - capped),
            "capped_tokens": int(lengths[capped:].sum()),
            "duplicates": int(capped - len(kept)),
            "near_duplicates": int(len(exact_kept) - len(kept)),
            "heldout_documents": int(len(held)),
            "heldout_tokens": int(sum(len(a) for a in heldout[name].ids)),
            "train_documents": int(len(train)),
            "train_tokens": int(length.sum()),
            "segments": int(len(length)),
        }
        floors[name] = split.floor_report(
            list(by_name).index(name),
            src,
            len(kept),
            stats[name]["heldout_documents"],
            stats[name]["heldout_tokens"],
        )
    factors = sampling_factors(
        {n: stats[n]["train_tokens"] for n in store}, {n: by_name[n].weight for n in store}, cfg.mix
    )
    source_index = {s.name: i for i, s in enumerate(cfg.sources)}
    picked_starts, picked_lens, picked_sources = [], [], []
    for name in store:
        picked = sample(seg_lens[name], factors[name], rng)
        picked_starts.append(seg_starts[name][picked])
        picked_lens.append(seg_lens[name][picked])
        picked_sources.append(np.full(len(picked), source_index[name], dtype=np.int32))
        stats[name]["sampling_factor"] = round(factors[name], 6)
        stats[name]["mixed_tokens"] = int(seg_lens[name][picked].sum())
        stats[name]["mixed_segments"] = int(len(picked))
    total = sum(s["mixed_tokens"] for s in stats.values()) or 1
    warning = mix_warning(
        {n: stats[n]["train_tokens"] for n in store},
        {n: stats[n]["mixed_tokens"] for n in store},
        {n: by_name[n].weight for n in store},
        cfg.mix,
    )
    if warning:
        log.warning(warning)
    for s in stats.values():
        s["mixed_share"] = round(s["mixed_tokens"] / total, 6)
    rows = Rows(
        seg_start=np.concatenate(picked_starts).astype(np.int64),
        seg_len=np.concatenate(picked_lens).astype(np.int64),
        seg_source=np.concatenate(picked_sources),
        seq_length=cfg.seq_length,
        window=cfg.pack_window,
        rng_state=rng.bit_generator.state,
    )
    floors = {name: report for name, report in floors.items() if report is not None}
    return Assembled(
        rows=rows,
        heldout=heldout,
        shards=[s for shards in store.values() for s in shards],
        stats=stats,
        source_index=source_index,
        floors=floors,
    )


def _heldout(
    source: SourceDocs, held: np.ndarray, lengths: np.ndarray, chunker: Chunker, encoder: Encoder
) -> HeldOut:
    """The held-out documents: their text, sizes and ids (read from the store for these rows only, or
    tokenized again whole where the stored ids are not whole documents')."""
    texts = source.take("text", held).to_pylist() if len(held) else []
    num_bytes = source.table.column("num_bytes").to_numpy()[held].tolist()
    if chunker.heldout_whole:  # the stored ids are not whole documents': evaluate on whole documents
        ids = encoder.encode(texts) if texts else []
    else:
        ids = _document_ids(source, held, lengths[held])
    return HeldOut(texts=texts, ids=ids, num_bytes=num_bytes)


def _document_ids(source: SourceDocs, rows: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """The ids of documents `rows` (their token counts: `lengths`), one int32 array each."""
    if not len(rows):
        return []
    flat = (
        source.take("input_ids", rows).flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    )
    return np.split(flat, np.cumsum(lengths)[:-1])

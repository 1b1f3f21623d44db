"""From cached, tokenized documents to training rows: dedup -> held-out split -> chunk -> mix -> pack.

Everything here works on ids already on disk (memory-mapped Arrow), so changing `seq_length`,
`chunking` between token strategies, the weights or the held-out split costs seconds, not a
re-tokenization.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cptkit.config.data import DataConfig, SourceConfig
from cptkit.data.chunk import Chunker
from cptkit.data.dedup import Deduper
from cptkit.data.mix import mix_warning, sample, sampling_factors
from cptkit.data.near_dedup import NearDeduper
from cptkit.data.pack import best_fit_pack
from cptkit.data.split import Floor, HeldoutSplit
from cptkit.data.steps import CorpusStep, SourceDocs
from cptkit.data.tokenize import Encoder
from cptkit.data.workers import usable_cores

log = logging.getLogger(__name__)
_GATHER_TOKENS = 1 << 22  # tokens gathered per block of rows written


@dataclass
class HeldOut:
    """One source's held-out documents: text, whole-document ids, UTF-8 sizes."""

    texts: list[str]
    ids: list[np.ndarray]
    num_bytes: list[int]


class Block(NamedTuple):
    """Consecutive whole rows: their tokens and position ids end to end, where each row starts in them
    (`row_offsets`, from 0, one more than the rows), and the source id of each of their segments with
    where each row's segments start (`segment_offsets`)."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    row_offsets: np.ndarray
    source_ids: np.ndarray
    segment_offsets: np.ndarray


@dataclass
class Rows:
    """Packed training rows, gathered from the token store a block of rows at a time (so the rows are
    never all in memory at once): row r holds the segments seg_bounds[r]:seg_bounds[r + 1], each
    `seg_len` tokens of `flat` from `seg_src`, its position ids counting from 0, taken from the source
    whose id (`source_index` in the manifest) is `seg_source`."""

    flat: np.ndarray
    seg_src: np.ndarray
    seg_len: np.ndarray
    seg_bounds: np.ndarray
    seg_source: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.seg_bounds) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.seg_len.sum())

    @property
    def num_segments(self) -> int:
        return len(self.seg_len)

    def blocks(self, max_tokens: int = _GATHER_TOKENS) -> Iterator[Block]:
        """Consecutive whole rows, about `max_tokens` tokens a block (at least one row)."""
        token_bounds = np.concatenate([[0], np.cumsum(self.seg_len, dtype=np.int64)])
        row_tokens = token_bounds[self.seg_bounds]
        row = 0
        while row < self.num_rows:
            end = int(np.searchsorted(row_tokens, row_tokens[row] + max_tokens, side="right")) - 1
            end = min(max(end, row + 1), self.num_rows)
            a, b = int(self.seg_bounds[row]), int(self.seg_bounds[end])
            lens = self.seg_len[a:b]
            local_start = token_bounds[a:b] - token_bounds[a]
            positions = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(local_start, lens)
            input_ids = self.flat[np.repeat(self.seg_src[a:b], lens) + positions]
            yield Block(
                input_ids,
                positions.astype(np.int32),
                row_tokens[row : end + 1] - row_tokens[row],
                self.seg_source[a:b].astype(np.int32),
                self.seg_bounds[row : end + 1] - a,
            )
            row = end


@dataclass
class Assembled:
    rows: Rows
    heldout: dict[str, HeldOut]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_index: dict[str, int] = field(default_factory=dict)  # source name -> its id, config order
    floors: dict[str, dict[str, Any]] = field(default_factory=dict)  # source -> its held-out floor, met?


def _flat(column: pa.ChunkedArray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(all values, per-row lengths) of a list<int32> column; the values are copied into `out` (whose
    start they fill) when given, so the sources' tokens land in one array without a second copy."""
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    values = [c.flatten().to_numpy(zero_copy_only=False) for c in column.chunks]
    if out is None:
        return (
            np.concatenate(values).astype(np.int32, copy=False) if values else np.empty(0, np.int32)
        ), lengths
    at = 0
    for v in values:
        out[at : at + len(v)] = v
        at += len(v)
    return out[:at], lengths


def _total_tokens(tables: dict[str, pa.Table]) -> int:
    return sum(int(pc.sum(pc.list_value_length(t.column("input_ids"))).as_py() or 0) for t in tables.values())


def _starts(column: pa.ChunkedArray, docs: np.ndarray) -> list[np.ndarray] | None:
    if column.null_count == len(column):
        return None
    flat, lengths = _flat(column)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [flat[bounds[d] : bounds[d + 1]] for d in docs]


def assemble(tables: dict[str, pa.Table], cfg: DataConfig, encoder: Encoder) -> Assembled:
    """Dedup across sources, split held-out documents, chunk, mix by weight and pack best-fit."""
    deduper = Deduper(cfg.dedup in ("exact", "near"))
    near = NearDeduper(
        cfg.near_dedup_threshold, enabled=cfg.dedup == "near", workers=cfg.num_proc or usable_cores()
    )
    floor = Floor(cfg.heldout_min_documents, cfg.heldout_min_tokens)
    split = HeldoutSplit(cfg.heldout_fraction, cfg.heldout_max_documents, cfg.seed, floor)
    try:
        return _assemble(tables, cfg, encoder, deduper, near, split)
    finally:
        near.close()


def _assemble(
    tables: dict[str, pa.Table],
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
    flat_all = np.empty(_total_tokens(tables), np.int32)  # every source's cached tokens, one copy
    base = 0
    for name, table in tables.items():
        source = SourceDocs(name, by_name[name], table)
        exact_kept = exact.select(source, np.arange(table.num_rows))
        kept = near.select(source, exact_kept)
        held = split.select(source, kept)
        train = np.setdiff1d(kept, held, assume_unique=True)
        flat, lengths = _flat(table.column("input_ids"), out=flat_all[base:])
        doc_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        heldout[name] = _heldout(table, held, flat, doc_start, lengths, chunker, encoder)
        doc, off, length = chunker.segments(lengths[train], _starts(table.column("starts"), train))
        seg_starts[name] = base + doc_start[train][doc] + off
        seg_lens[name] = length
        base += len(flat)
        chars = table.column("num_chars").to_numpy()
        stats[name] = {
            "documents": int(len(kept)),
            "characters": int(chars[kept].sum()),
            "tokens": int(lengths[kept].sum()),
            "duplicates": int(table.num_rows - len(kept)),
            "near_duplicates": int(len(exact_kept) - len(kept)),
            "heldout_documents": int(len(held)),
            "heldout_tokens": int(sum(len(a) for a in heldout[name].ids)),
            "train_documents": int(len(train)),
            "train_tokens": int(length.sum()),
            "segments": int(len(length)),
        }
        floors[name] = split.floor_report(
            list(by_name).index(name),
            by_name[name],
            len(kept),
            stats[name]["heldout_documents"],
            stats[name]["heldout_tokens"],
        )
    factors = sampling_factors(
        {n: stats[n]["train_tokens"] for n in tables}, {n: by_name[n].weight for n in tables}, cfg.mix
    )
    source_index = {s.name: i for i, s in enumerate(cfg.sources)}
    picked_starts, picked_lens, picked_sources = [], [], []
    for name in tables:
        picked = sample(seg_lens[name], factors[name], rng)
        picked_starts.append(seg_starts[name][picked])
        picked_lens.append(seg_lens[name][picked])
        picked_sources.append(np.full(len(picked), source_index[name], dtype=np.int32))
        stats[name]["sampling_factor"] = round(factors[name], 6)
        stats[name]["mixed_tokens"] = int(seg_lens[name][picked].sum())
        stats[name]["mixed_segments"] = int(len(picked))
    total = sum(s["mixed_tokens"] for s in stats.values()) or 1
    warning = mix_warning(
        {n: stats[n]["train_tokens"] for n in tables},
        {n: stats[n]["mixed_tokens"] for n in tables},
        {n: by_name[n].weight for n in tables},
        cfg.mix,
    )
    if warning:
        log.warning(warning)
    for s in stats.values():
        s["mixed_share"] = round(s["mixed_tokens"] / total, 6)
    n_segments = sum(len(x) for x in picked_lens)
    log.info("packing %s segments best-fit into rows of %d tokens", f"{n_segments:,}", cfg.seq_length)
    rows = _pack(
        flat_all,
        np.concatenate(picked_starts),
        np.concatenate(picked_lens),
        cfg.seq_length,
        rng,
        np.concatenate(picked_sources),
    )
    floors = {name: report for name, report in floors.items() if report is not None}
    return Assembled(rows=rows, heldout=heldout, stats=stats, source_index=source_index, floors=floors)


def _heldout(table, held, flat, doc_start, lengths, chunker: Chunker, encoder: Encoder) -> HeldOut:
    texts = table.column("text").take(pa.array(held, pa.int64())).to_pylist() if len(held) else []
    num_bytes = table.column("num_bytes").to_numpy()[held].tolist()
    if chunker.heldout_whole:  # the cached ids are not whole documents': evaluate on whole documents
        ids = encoder.encode(texts) if texts else []
    else:
        ids = [flat[doc_start[d] : doc_start[d] + lengths[d]] for d in held]
    return HeldOut(texts=texts, ids=ids, num_bytes=num_bytes)


def _pack(
    flat: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    seq_length: int,
    rng,
    sources: np.ndarray | None = None,
) -> Rows:
    """Pack segments best-fit into rows and shuffle the rows; their ids are gathered when written.
    `sources` is each segment's source id (default: all 0)."""
    if sources is None:
        sources = np.zeros(len(lens), dtype=np.int32)
    rows = best_fit_pack(lens.tolist(), seq_length)
    order_rows = rng.permutation(len(rows))
    seg_order = np.fromiter((i for r in order_rows for i in rows[r]), dtype=np.int64, count=len(lens))
    per_row = np.fromiter((len(rows[r]) for r in order_rows), dtype=np.int64, count=len(rows))
    return Rows(
        flat=flat,
        seg_src=starts[seg_order].astype(np.int64),
        seg_len=lens[seg_order].astype(np.int64),
        seg_bounds=np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64),
        seg_source=sources[seg_order].astype(np.int32),
    )

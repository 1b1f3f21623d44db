"""Read -> normalise -> filter -> tokenize one source, shard by shard, into a cache on disk.

A shard is a run of input files (about `SHARD_BYTES` of them; a large file is a shard alone). Its
cache entry is keyed on the files' content hashes and on everything that changes the ids: tokenizer,
normalisation, filters, text field and the tokenization unit (whole documents, sentences, or
character chunks). Dedup, held-out split, chunking, mixing and packing come later and work on the
cached ids, so changing them (or `seq_length`) never tokenizes again. Each entry is written to a
temporary name and renamed, then its stats file is written: an interrupted run resumes at the first
shard without stats.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cptkit.data import normalize as normalize_mod
from cptkit.data.document import Document, Ledger
from cptkit.data.filters import build_filters, first_reason
from cptkit.data.hashing import digest
from cptkit.data.readers import SourcePlan, read_documents
from cptkit.data.tokenize import Encoder

log = logging.getLogger(__name__)

SHARD_BYTES = 256 << 20
BATCH_CHARS = 1 << 18
BATCH_DOCS = 1024

SCHEMA = pa.schema(
    [
        ("hash", pa.binary(16)),
        ("where", pa.string()),
        ("num_chars", pa.int64()),
        ("num_bytes", pa.int64()),
        ("text", pa.large_string()),
        ("input_ids", pa.list_(pa.int32())),
        ("starts", pa.list_(pa.int32())),
    ]
)


@dataclass
class Shard:
    """Input files tokenized (and cached) together."""

    source: str
    index: int
    files: list[Path]
    key: str
    bytes: int

    def path(self, cache_dir: Path) -> Path:
        return cache_dir / self.source / f"{self.key}.arrow"

    def stats_path(self, cache_dir: Path) -> Path:
        return cache_dir / self.source / f"{self.key}.json"


@dataclass
class ShardStats:
    """What reading a shard found: documents read and kept, characters, tokens, and the ledger."""

    read: int = 0  # documents (files or rows) found, including those dropped
    kept: int = 0
    characters: int = 0
    tokens: int = 0
    ledger: Ledger = field(default_factory=Ledger)

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "kept": self.kept,
            "characters": self.characters,
            "tokens": self.tokens,
            **self.ledger.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardStats:
        return cls(d["read"], d["kept"], d["characters"], d["tokens"], Ledger.from_dict(d))


def tokenization_unit(chunking: str, chunk_chars: int) -> str:
    """What one tokenizer call sees: a whole document, a document with sentence starts, or a char chunk."""
    return {"chars": f"chars:{chunk_chars}", "sentences": "sentences"}.get(chunking, "document")


def plan_shards(
    source: str, plan: SourcePlan, sha256: dict[Path, str], settings: dict[str, Any]
) -> list[Shard]:
    """Group a source's files into shards and key each on its content and the settings that change ids."""
    groups: list[list[Path]] = []
    size = SHARD_BYTES
    for path in plan.files:
        if plan.dataset is None and size >= SHARD_BYTES:
            groups.append([])
            size = 0
        elif plan.dataset is not None and not groups:
            groups.append([])
        groups[-1].append(path)
        size += path.stat().st_size
    shards = []
    for i, files in enumerate(groups):
        key = digest(settings, [sha256[p] for p in files], [p.name for p in files])
        shards.append(Shard(source, i, files, key, sum(p.stat().st_size for p in files)))
    return shards


# --- the work on a batch of documents; runs in worker processes (state inherited by fork) ---

_WORKER: dict[str, Any] = {}


def _setup(encoder: Encoder, filters_cfg: Any, unit: str) -> None:
    _WORKER.update(encoder=encoder, filters=build_filters(filters_cfg), unit=unit)


def process_batch(docs: list[tuple[str, str]]) -> dict[str, Any]:
    """Normalise, filter, hash and tokenize a batch; returns columns for the cache and the drops."""
    encoder, filters, unit = _WORKER["encoder"], _WORKER["filters"], _WORKER["unit"]
    texts, wheres, hashes, nbytes, drops = [], [], [], [], []
    for raw, where in docs:
        text = normalize_mod.normalize(raw)
        reason = first_reason(text, filters)
        if reason is not None:
            drops.append((reason, where))
            continue
        data = text.encode("utf-8")
        texts.append(text)
        wheres.append(where)
        hashes.append(hashlib.blake2b(data, digest_size=16).digest())
        nbytes.append(len(data))
    starts = None
    if unit == "document":
        ids = encoder.encode(texts)
    elif unit == "sentences":
        ids, starts = encoder.encode_sentences(texts)
    else:
        ids, starts = encoder.encode_chunks(texts, int(unit.split(":")[1]))
    return {
        "texts": texts,
        "wheres": wheres,
        "hashes": hashes,
        "num_bytes": nbytes,
        "drops": drops,
        "ids": _flatten(ids),
        "starts": _flatten(starts) if starts is not None else None,
    }


def _flatten(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.empty(0, np.int32)
    return values.astype(np.int32, copy=False), offsets


def _list_array(flat: tuple[np.ndarray, np.ndarray] | None, n: int) -> pa.Array:
    if flat is None:
        return pa.nulls(n, pa.list_(pa.int32()))
    values, offsets = flat
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which containers and job schedulers set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Tokenizing:
    """Runs `process_batch` over batches of documents on `num_proc` workers.

    Fast (Rust) tokenizers release the GIL while encoding, so threads keep every core busy without
    copying text between processes; slow (Python) tokenizers get a process pool instead. Submission
    is bounded (two batches per worker in flight), so reading stays a stream."""

    def __init__(self, encoder: Encoder, filters_cfg: Any, unit: str, num_proc: int, kind: str | None = None):
        _setup(encoder, filters_cfg, unit)
        self.num_proc = num_proc
        self.kind = kind or ("threads" if encoder.backend is not None else "processes")
        self.pool: Any = None
        if num_proc > 1 and self.kind == "threads":
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(num_proc, thread_name_prefix="cptkit-tokenize")
        elif num_proc > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            self.pool = ctx.Pool(num_proc, initializer=_setup, initargs=(encoder, filters_cfg, unit))

    def _submit(self, batch):
        if self.kind == "threads":
            return self.pool.submit(process_batch, batch).result
        return self.pool.apply_async(process_batch, (batch,)).get

    def map(self, batches: Iterator[list[tuple[str, str]]]) -> Iterator[dict[str, Any]]:
        if self.pool is None:
            for batch in batches:
                yield process_batch(batch)
            return
        pending: deque = deque()
        for batch in batches:
            pending.append(self._submit(batch))
            if len(pending) >= 2 * self.num_proc:
                yield pending.popleft()()
        while pending:
            yield pending.popleft()()

    def close(self) -> None:
        if self.pool is None:
            return
        if self.kind == "threads":
            self.pool.shutdown(wait=True, cancel_futures=True)
        else:
            self.pool.terminate()
            self.pool.join()
        self.pool = None


def _batches(docs: Iterator[Document], stats: ShardStats) -> Iterator[list[tuple[str, str]]]:
    batch, chars = [], 0
    for doc in docs:
        stats.read += 1
        batch.append((doc.text, doc.where))
        chars += len(doc.text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_shard(
    shard: Shard, plan: SourcePlan, text_field: str, work: Tokenizing, cache_dir: Path
) -> ShardStats:
    """Tokenize one shard into its cache entry (atomically); returns what was read and dropped."""
    stats = ShardStats()
    target = shard.path(cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    docs = read_documents(plan, shard.files, text_field, stats.ledger)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        for result in work.map(_batches(docs, stats)):
            for reason, where in result["drops"]:
                stats.ledger.drop(reason, where)
            n = len(result["texts"])
            stats.kept += n
            stats.characters += sum(len(t) for t in result["texts"])
            stats.tokens += int(result["ids"][1][-1])
            if n:
                writer.write_batch(_record_batch(result, n))
    tmp.replace(target)
    stats.read = stats.kept + sum(stats.ledger.drops.values())  # rows dropped by readers count as read
    tmp_stats = shard.stats_path(cache_dir).with_suffix(".json.tmp")
    tmp_stats.write_text(json.dumps(stats.to_dict()), encoding="utf-8")
    tmp_stats.replace(shard.stats_path(cache_dir))
    return stats


def _record_batch(result: dict[str, Any], n: int) -> pa.RecordBatch:
    texts = result["texts"]
    return pa.record_batch(
        [
            pa.array(result["hashes"], pa.binary(16)),
            pa.array(result["wheres"], pa.string()),
            pa.array([len(t) for t in texts], pa.int64()),
            pa.array(result["num_bytes"], pa.int64()),
            pa.array(texts, pa.large_string()),
            _list_array(result["ids"], n),
            _list_array(result["starts"], n),
        ],
        schema=SCHEMA,
    )


def cached_stats(shard: Shard, cache_dir: Path) -> ShardStats | None:
    """The stats of a finished cache entry, or None when the shard still needs tokenizing."""
    path = shard.stats_path(cache_dir)
    if not (path.is_file() and shard.path(cache_dir).is_file()):
        return None
    try:
        return ShardStats.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError):
        return None


def open_shard(shard: Shard, cache_dir: Path) -> pa.Table:
    """A cached shard as a memory-mapped Arrow table (nothing is copied until used)."""
    return pa.ipc.open_file(pa.memory_map(str(shard.path(cache_dir)))).read_all()


def settings_for(text_field: str, filters: dict[str, Any], unit: str, tokenizer_fp: str) -> dict[str, Any]:
    """Everything that changes a shard's cached ids."""
    return {
        "text_field": text_field,
        "filters": filters,
        "unit": unit,
        "tokenizer": tokenizer_fp,
        "normalize": normalize_mod.VERSION,
        "format": 1,
    }

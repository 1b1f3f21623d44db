"""Read -> normalise -> filter -> tokenize one source, shard by shard, into the token store on disk.

A shard is a run of input files (about `SHARD_BYTES` of them; a large file is a shard alone). Its
store file (`store/<source>/<key>.arrow`, an Arrow IPC file: hash, where, num_chars, num_bytes, text,
input_ids, starts per document) is keyed on the files' content hashes and on everything that changes
the ids: tokenizer, normalisation, filters, text field and the tokenization unit (whole documents,
sentences, or character chunks). Its schema metadata names the store format and the tokenizer
fingerprint, so a reader can refuse a file of another format or tokenizer. Dedup, held-out split,
chunking, mixing and packing come later and work on the stored ids (training reads them in place), so
changing them (or `seq_length`) never tokenizes again. Each file is written to a temporary name and
renamed, then its stats file is written: a shard is finished when its stats file exists, and an
interrupted run resumes at the first shard without one.
A shard may also be one shard of a hub source's stream (`cptkit.data.hub`). A capped source's shard
(`max_documents` / `max_tokens`, part of its key) stops reading once the documents it kept reach the
cap: what follows is never kept, so never read.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from cptkit.config.data import FilterConfig
from cptkit.data import normalize as normalize_mod
from cptkit.data.caps import Cap
from cptkit.data.chunk import Chunker
from cptkit.data.document import Document, Ledger
from cptkit.data.filters import build_filters
from cptkit.data.hashing import digest, file_size
from cptkit.data.hub import HubPlan, read_hub_shard
from cptkit.data.readers import Progress, SourcePlan, read_documents
from cptkit.data.steps import DocumentStep
from cptkit.data.tokenize import Encoder
from cptkit.data.workers import Batch, BatchProcessor, Flat, PoolKind, Workers
from cptkit.outputs import temporary_beside

log = logging.getLogger(__name__)

SHARD_BYTES = 256 << 20
BATCH_CHARS = 1 << 18
BATCH_DOCS = 1024
STORE_BATCH_BYTES = 32 << 20  # a store file's record batches: the workers' batches joined to this size

STORE_FORMAT = 2  # of a store file: its schema metadata's `cptkit_store_format`
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


def store_schema(fingerprint: str) -> pa.Schema:
    """The schema of a store file of ids made by the tokenizer of `fingerprint`, with the metadata that
    says so (`cptkit_store_format`, `tokenizer_fingerprint`)."""
    return SCHEMA.with_metadata(
        {b"cptkit_store_format": str(STORE_FORMAT).encode(), b"tokenizer_fingerprint": fingerprint.encode()}
    )


@dataclass
class Shard:
    """Input files tokenized (and stored) together."""

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
    """What reading a shard found: documents read and kept, characters, tokens, words, and the ledger.

    `words` (whitespace-separated) of the kept documents, and `spaceless` (characters of scripts without
    spaces) of the `sampled` characters at their starts, give the source's fertility; None in a stats file written before they were counted, and
    then in any sum it is part of (fertility per word is then absent, never wrong)."""

    read: int = 0  # documents (files or rows) found, including those dropped
    kept: int = 0
    characters: int = 0
    tokens: int = 0
    ledger: Ledger = field(default_factory=Ledger)
    words: int | None = 0
    spaceless: int | None = 0
    sampled: int | None = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "kept": self.kept,
            "characters": self.characters,
            "tokens": self.tokens,
            "words": self.words,
            "spaceless": self.spaceless,
            "sampled": self.sampled,
            **self.ledger.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardStats:
        return cls(
            d["read"],
            d["kept"],
            d["characters"],
            d["tokens"],
            Ledger.from_dict(d),
            words=d.get("words"),
            spaceless=d.get("spaceless"),
            sampled=d.get("sampled"),
        )

    def add(self, other: ShardStats) -> None:
        """Count `other` (another shard of the same source) in."""
        self.read += other.read
        self.kept += other.kept
        self.characters += other.characters
        self.tokens += other.tokens
        self.words = _plus(self.words, other.words)
        self.spaceless = _plus(self.spaceless, other.spaceless)
        self.sampled = _plus(self.sampled, other.sampled)
        self.ledger.merge(other.ledger)


def _plus(a: int | None, b: int | None) -> int | None:
    """a + b, unknown (None) where either is."""
    return None if a is None or b is None else a + b


def plan_shards(
    source: str, plan: SourcePlan, sha256: dict[Path, str], settings: dict[str, Any]
) -> list[Shard]:
    """Group a source's files into shards (a hub source: its stream's shards) and key each on its content
    and the settings that change ids."""
    if plan.hub is not None:
        return [_hub_shard(source, plan.hub, i, sha256, settings) for i in range(plan.hub.num_shards)]
    groups: list[list[Path]] = []
    size = SHARD_BYTES
    for path in plan.files:
        if plan.dataset is None and size >= SHARD_BYTES:
            groups.append([])
            size = 0
        elif plan.dataset is not None and not groups:
            groups.append([])
        groups[-1].append(path)
        size += file_size(path)
    shards = []
    for i, files in enumerate(groups):
        key = digest(settings, [sha256[p] for p in files], [p.name for p in files])
        shards.append(Shard(source, i, files, key, sum(file_size(p) for p in files)))
    return shards


def _hub_shard(
    source: str, hub: HubPlan, index: int, sha256: dict[Path, str], settings: dict[str, Any]
) -> Shard:
    """Shard `index` of a hub source's stream, keyed on its data files' content hashes where they are on
    this machine, else on the commit (or revision) read and the files' names."""
    files = hub.shard_files(index)
    names = [f.rsplit("/", 1)[-1] for f in files]
    if hub.local:
        local = [Path(f) for f in files]
        content: Any = [sha256[p] for p in local]
    else:
        local, content = [], hub.identity()
    what = {
        "config": hub.name,
        "split": hub.split,
        "data_files": hub.data_files,
        "shard": [index, hub.num_shards],
    }
    key = digest(settings, content, names, what)
    return Shard(source, index, local, key, hub.shard_bytes(index))


@dataclass(frozen=True)
class ShardTask:
    """Everything tokenizing one shard needs, and nothing else: the unit of work an executor runs.

    It is picklable (the tokenizer pickles as its spec) and `tokenize_shard(task)` depends only on it and
    on the store on disk, so tasks may run in any order, in other processes or on other machines that
    see the inputs and `cache_dir` (the store folder)."""

    shard: Shard
    plan: SourcePlan
    text_field: str
    filters: FilterConfig
    chunker: Chunker
    tokenizer: Any  # a loaded HF tokenizer (truncation and padding off)
    cache_dir: Path  # the store folder, `<out>/store`
    fingerprint: str  # the tokenizer's (`tokenizer_fingerprint`), written into the store file's metadata
    num_proc: int = 1
    pool: PoolKind | None = None  # threads or processes; None: threads for a fast tokenizer
    cap: Cap | None = None  # the source's caps: reading stops once the documents kept reach them

    def steps(self) -> list[DocumentStep]:
        """The document steps, in order: normalise, then the filters (cheapest first)."""
        return [normalize_mod.normalize, *build_filters(self.filters)]


def tokenize_shard(task: ShardTask, progress: Progress | None = None) -> ShardStats:
    """Tokenize one shard into its store file (atomically); returns what was read and dropped.
    `progress(n)` is told of every n bytes of input read (a capped shard that stops early: of the rest
    at once, so its bytes add up)."""
    shard, cache_dir = task.shard, task.cache_dir
    stats = ShardStats()
    target = shard.path(cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(target)
    reported = [0]

    def counted(n: int) -> None:
        reported[0] += n
        if progress is not None:
            progress(n)

    reading = _ReadBatches(task, counted)
    processor = BatchProcessor(Encoder(task.tokenizer), task.steps(), task.chunker)
    tmp_stats = temporary_beside(shard.stats_path(cache_dir))
    schema = store_schema(task.fingerprint)
    try:
        with (
            Workers(processor, task.num_proc, task.pool) as workers,
            pa.OSFile(str(tmp), "wb") as sink,
            pa.ipc.new_file(sink, schema) as ipc_writer,
        ):
            writer = _JoinedBatches(ipc_writer, STORE_BATCH_BYTES)
            for batch in workers.map(reading):
                stats.ledger.merge(reading.drops_before())
                stats.ledger.merge(batch.dropped)
                n = len(batch.texts)
                stats.kept += n
                stats.characters += sum(len(t) for t in batch.texts)
                stats.tokens += int(batch.ids[1][-1])
                stats.words += batch.words
                stats.spaceless += batch.spaceless
                stats.sampled += batch.sampled
                if n:
                    writer.write_batch(_record_batch(batch, n, schema))
                if task.cap is not None and task.cap.reached(stats.kept, stats.tokens):
                    counted(max(shard.bytes - reported[0], 0))
                    break
            else:
                stats.ledger.merge(reading.drops_before())  # rows dropped after the last document
            writer.flush()
        _fsync(tmp)  # on disk before the stats file says it is finished
        tmp.replace(target)
        stats.read = stats.kept + sum(stats.ledger.drops.values())  # rows dropped by readers count as read
        tmp_stats.write_text(json.dumps(stats.to_dict()), encoding="utf-8")
        tmp_stats.replace(shard.stats_path(cache_dir))
    finally:  # a failed write (a full disk, an interrupt) leaves no temporary to keep the disk full
        reading.close()
        tmp.unlink(missing_ok=True)
        tmp_stats.unlink(missing_ok=True)
    return stats


class _JoinedBatches:
    """Writes the workers' small record batches joined into batches of about `size` bytes: a file of
    a few large batches opens fast and keeps each column's values together, so reading one column of
    every document (the token counts, the hashes) reads that column alone, not a page of every batch."""

    def __init__(self, writer: pa.ipc.RecordBatchFileWriter, size: int):
        self.writer, self.size = writer, size
        self.pending: list[pa.RecordBatch] = []
        self.nbytes = 0

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.nbytes += batch.nbytes
        if self.nbytes >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            joined = pa.Table.from_batches(self.pending).combine_chunks()
            for batch in joined.to_batches():
                self.writer.write_batch(batch)
        self.pending, self.nbytes = [], 0


class _ReadBatches:
    """A shard's documents in batches, and the rows the reader dropped on the way, batch by batch.

    The workers read a few batches ahead of the one being written; a shard that stops at its cap must
    count only the drops met before the documents it kept, the same however far ahead they read."""

    def __init__(self, task: ShardTask, progress: Progress):
        self.ledger = Ledger()
        if task.plan.hub is not None:
            docs = read_hub_shard(task.plan.hub, task.shard.index, task.text_field, self.ledger, progress)
        else:
            docs = read_documents(task.plan, task.shard.files, task.text_field, self.ledger, progress)
        self.docs = docs
        self.pending: deque[Ledger] = deque()  # the reader's drops before each batch handed out

    def __iter__(self) -> Iterator[list[Document]]:
        for batch in _batches(self.docs):
            self.pending.append(_take(self.ledger))
            yield batch

    def drops_before(self) -> Ledger:
        """The reader's drops before the next batch written (after the last one: those after it)."""
        return self.pending.popleft() if self.pending else _take(self.ledger)

    def close(self) -> None:
        self.docs.close()


def _take(ledger: Ledger) -> Ledger:
    """What `ledger` holds, moved into a new one (`ledger` is left empty, for what comes next)."""
    taken = Ledger(Counter(ledger.drops), Counter(ledger.repairs), dict(ledger.examples))
    ledger.drops.clear()
    ledger.repairs.clear()
    ledger.examples.clear()
    return taken


def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _list_array(flat: Flat | None, n: int) -> pa.Array:
    if flat is None:
        return pa.nulls(n, pa.list_(pa.int32()))
    values, offsets = flat
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _record_batch(batch: Batch, n: int, schema: pa.Schema) -> pa.RecordBatch:
    texts = batch.texts
    return pa.record_batch(
        [
            pa.array(batch.hashes, pa.binary(16)),
            pa.array(batch.wheres, pa.string()),
            pa.array([len(t) for t in texts], pa.int64()),
            pa.array(batch.num_bytes, pa.int64()),
            pa.array(texts, pa.large_string()),
            _list_array(batch.ids, n),
            _list_array(batch.starts, n),
        ],
        schema=schema,
    )


def cached_stats(shard: Shard, cache_dir: Path) -> ShardStats | None:
    """The stats of a finished store file, or None when the shard still needs tokenizing: no stats
    file, or a store file that is not whole (a crash before it reached the disk, a file damaged or
    replaced: its footer unreadable or its documents not the ones the stats count)."""
    path = shard.stats_path(cache_dir)
    if not (path.is_file() and shard.path(cache_dir).is_file()):
        return None
    try:
        stats = ShardStats.from_dict(json.loads(path.read_text(encoding="utf-8")))
        with pa.memory_map(str(shard.path(cache_dir))) as source:
            reader = pa.ipc.open_file(source)
            documents = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return None
    if documents != stats.kept:
        log.warning(
            "%s: holds %d documents, not the %d its stats count: tokenizing it again",
            shard.path(cache_dir),
            documents,
            stats.kept,
        )
        return None
    return stats


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def open_shard(shard: Shard, cache_dir: Path) -> pa.Table:
    """A stored shard as a memory-mapped Arrow table (nothing is copied until used)."""
    return pa.ipc.open_file(pa.memory_map(str(shard.path(cache_dir)))).read_all()


def settings_for(text_field: str, filters: dict[str, Any], unit: str, tokenizer_fp: str) -> dict[str, Any]:
    """Everything that changes a shard's stored ids (`unit`: the chunker's `unit`); `format` is the store
    format's (files of an older format are not reused)."""
    return {
        "text_field": text_field,
        "filters": filters,
        "unit": unit,
        "tokenizer": tokenizer_fp,
        "normalize": normalize_mod.VERSION,
        "format": STORE_FORMAT,
    }

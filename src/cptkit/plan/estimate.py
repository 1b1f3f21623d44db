"""Tokens per source before `cptkit prepare` ran: each source's files listed and sized, a sample of
each (`SAMPLE_BYTES`, files taken in a seeded random order) read, normalised, filtered, deduplicated
exactly, tokenized and chunked as prepare does, and scaled to the source's size on disk. The held-out
split and the mix follow prepare's rules (`cptkit.data.split`, `cptkit.data.mix`) on the estimated
counts. With no tokenizer on disk, tokens are `BYTES_PER_TOKEN` bytes each (said in the notes)."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cptkit.config.data import DataConfig, SourceConfig
from cptkit.data import normalize
from cptkit.data.chunk import Chunker, windows
from cptkit.data.document import Ledger
from cptkit.data.filters import build_filters
from cptkit.data.hashing import file_size
from cptkit.data.mix import sampling_factors
from cptkit.data.pack import best_fit_pack
from cptkit.data.readers import TEXT_FORMATS, file_format, plan_source, read_documents
from cptkit.data.split import FLOOR_SHARE, Floor, HeldoutSplit
from cptkit.data.steps import Drop, apply_steps
from cptkit.data.tokenize import Encoder, load_tokenizer
from cptkit.errors import CptkitError
from cptkit.plan.tokens import DataTokens, SourceTokens

SAMPLE_BYTES = 4 << 20  # read per source
BYTES_PER_TOKEN = 4.0  # without a tokenizer: about right for English with a large BPE vocabulary
_BATCH = 256  # documents tokenized at once


@dataclass
class Sample:
    """What the start of one source gave: bytes on disk and read, and the documents kept in them."""

    bytes_total: int
    bytes_read: int = 0
    documents: int = 0
    tokens: int = 0
    segments: list[int] = field(default_factory=list)  # each training segment's length
    document_scale: float | None = None  # documents in the source per document read (None: bytes say)

    @property
    def scale(self) -> float:
        """Source size over sample size (1 when the whole source was read)."""
        return (
            self.bytes_total / self.bytes_read
            if self.bytes_read and self.bytes_total > self.bytes_read
            else 1.0
        )


class Counter:
    """Documents -> token counts and training segments, as prepare's tokenization and chunking give them."""

    def __init__(self, data: DataConfig, tokenizer: Any | None):
        self.chunker = Chunker.from_config(data)
        self.encoder = Encoder(tokenizer) if tokenizer is not None else None
        self.steps = [normalize.normalize, *build_filters(data.filters)]
        self.seen: set[bytes] = set()  # exact dedup across sources, first one kept

    def add(self, texts: list[str], sample: Sample) -> None:
        kept = []
        for text in texts:
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key not in self.seen:
                self.seen.add(key)
                kept.append(text)
        if not kept:
            return
        if self.encoder is None:
            lengths = np.array([math.ceil(len(t.encode("utf-8")) / BYTES_PER_TOKEN) + 1 for t in kept])
            segments = windows(lengths, self.chunker.seq_length)
        else:
            ids, starts = self.chunker.encode(self.encoder, kept)
            lengths = np.array([len(a) for a in ids], dtype=np.int64)
            segments = self.chunker.segments(lengths, starts)
        sample.documents += len(kept)
        sample.tokens += int(lengths.sum())
        sample.segments += segments[2].tolist()


def estimate_tokens(data: DataConfig, sample_bytes: int = SAMPLE_BYTES) -> DataTokens:
    """The counts `cptkit prepare` would write for `data`, estimated (see the module docstring)."""
    tokenizer, notes = _local_tokenizer(data)
    counter = Counter(data, tokenizer)
    samples = {}
    for i, source in enumerate(data.sources):
        if source.type == "hub":
            raise CptkitError(
                f"data.sources[{i}] ({source.name}): cptkit plan does not estimate hub sources yet; run "
                "cptkit prepare first, and plan reads the exact counts from its manifest"
            )
        if source.type == "self_replay":
            samples[source.name] = _self_replay_sample(source, counter.chunker.seq_length)
            notes.append(
                f"{source.name}: written by the base model at prepare time; estimated from its settings"
            )
        else:
            samples[source.name] = _sample_files(
                source, f"data.sources[{i}] ({source.name})", counter, sample_bytes
            )
    sources = _split_and_mix(data, samples)
    read = sum(s.bytes_read for s in samples.values())
    efficiency = _packing_efficiency(samples, data.seq_length)
    mixed = sum(s.mixed_tokens for s in sources.values())
    return DataTokens(
        sources=sources,
        seq_length=data.seq_length,
        rows=math.ceil(mixed / (data.seq_length * efficiency)) if efficiency else 0,
        packing_efficiency=efficiency,
        origin=f"estimated from {read / 1e6:.1f} MB sampled of {sum(s.bytes_total for s in samples.values()) / 1e6:.1f} MB "
        "(not prepared yet)",
        exact=False,
        notes=tuple(notes),
    )


def _local_tokenizer(data: DataConfig) -> tuple[Any | None, list[str]]:
    """The config's tokenizer from its folder or the HF cache; None (and a note) when it is a hub name
    not downloaded: the plan never goes to the network."""
    try:
        return load_tokenizer(data.tokenizer, data.trust_remote_code, local_files_only=True), []
    except CptkitError:
        if Path(data.tokenizer).exists():
            raise
        return None, [
            f"data.tokenizer: {data.tokenizer} is not on disk; tokens estimated at {BYTES_PER_TOKEN:g} bytes "
            "a token (download the tokenizer for a closer estimate)"
        ]


def _sample_files(source: SourceConfig, label: str, counter: Counter, budget: int) -> Sample:
    plan = plan_source(source.path, source.text_field, label)
    files = list(plan.files)
    random.Random(0).shuffle(files)  # a sample from across the source, the same every time
    sample = Sample(bytes_total=sum(file_size(p) for p in plan.files))
    one_per_file = plan.dataset is None and all(file_format(p)[0] in TEXT_FORMATS for p in files)

    def progress(n: int) -> None:
        sample.bytes_read += n

    batch, read = [], 0
    for doc in read_documents(plan, files, source.text_field, Ledger(), progress):
        read += 1
        if plan.dataset is not None:
            sample.bytes_read += len(doc.text.encode("utf-8"))
        text = apply_steps(counter.steps, doc.text)
        if not isinstance(text, Drop):
            batch.append(text)
        if len(batch) >= _BATCH:
            counter.add(batch, sample)
            batch = []
        if sample.bytes_read >= budget:
            break
    counter.add(batch, sample)
    if one_per_file and read:  # a file is a document: the count scales with files, not bytes
        sample.document_scale = len(files) / read
    return sample


def _self_replay_sample(source: SourceConfig, seq_length: int) -> Sample:
    spec = source.self_replay
    per_document = spec.max_new_tokens
    documents = spec.documents
    if spec.max_tokens is not None:
        documents = min(documents, math.ceil(spec.max_tokens / per_document))
    return Sample(
        bytes_total=0,
        documents=documents,
        tokens=documents * per_document,
        segments=[min(per_document, seq_length)] * documents * math.ceil(per_document / seq_length),
    )


def _split_and_mix(data: DataConfig, samples: dict[str, Sample]) -> dict[str, SourceTokens]:
    split = HeldoutSplit(
        data.heldout_fraction,
        data.heldout_max_documents,
        data.seed,
        Floor(data.heldout_min_documents, data.heldout_min_tokens),
    )
    counts = {
        n: (round(s.documents * (s.document_scale or s.scale)), round(s.tokens * s.scale))
        for n, s in samples.items()
    }
    held = {s.name: _heldout_tokens(split, s, *counts[s.name]) for s in data.sources}
    train = {n: counts[n][1] - held[n] for n in counts}
    weights = {s.name: s.weight for s in data.sources}
    factors = sampling_factors(train, weights, data.mix)
    return {
        s.name: SourceTokens(
            name=s.name,
            role=s.role,
            weight=s.weight,
            documents=counts[s.name][0],
            tokens=counts[s.name][1],
            heldout_tokens=held[s.name],
            train_tokens=train[s.name],
            mixed_tokens=round(factors[s.name] * train[s.name]),
        )
        for s in data.sources
    }


def _heldout_tokens(split: HeldoutSplit, source: SourceConfig, documents: int, tokens: int) -> int:
    """The tokens `HeldoutSplit` would hold out of a source of that many documents and tokens, taking
    every document to be of average length."""
    fraction, trains = split.fraction_for(source), source.weight > 0
    if documents <= int(trains) or fraction <= 0:
        return 0
    count = documents if fraction >= 1 else max(round(fraction * documents), 1)
    floor, average = split.floor_for(source), tokens / documents
    if floor.documents or floor.tokens:
        needed = max(floor.documents, math.ceil(floor.tokens / average) if floor.tokens else 0)
        count = max(count, min(needed, int(documents * FLOOR_SHARE)) if trains else min(needed, documents))
    most = documents - 1 if trains else documents
    count = min(count, most if split.max_documents is None else min(split.max_documents, most))
    return round(count * average)


def _packing_efficiency(samples: dict[str, Sample], seq_length: int) -> float:
    """Tokens over row capacity when the sampled segments are packed as prepare packs them."""
    lengths = [n for s in samples.values() for n in s.segments]
    if not lengths:
        return 0.0
    rows = len(best_fit_pack(lengths, seq_length))
    return sum(lengths) / (rows * seq_length)

"""The work on a batch of documents (document steps, hashing, tokenization) and the workers that run it.

Fast (Rust) tokenizers release the GIL while encoding, so threads keep every core busy without
copying text between processes; slow (Python) tokenizers get a process pool instead. Submission is
bounded (two batches per worker in flight), so reading stays a stream.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cptkit.data.chunk import Chunker
from cptkit.data.document import Document, Ledger
from cptkit.data.fertility import count_words
from cptkit.data.steps import DocumentStep, run_steps
from cptkit.data.tokenize import Encoder

Flat = tuple[np.ndarray, np.ndarray]  # (all values, offsets) of a list of arrays
PoolKind = Literal["threads", "processes"]


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which containers and job schedulers set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Batch:
    """What one batch of documents gave: the kept documents' columns for the store, and the drops."""

    texts: list[str]
    wheres: list[str]
    hashes: list[bytes]
    num_bytes: list[int]
    ids: Flat
    starts: Flat | None
    dropped: Ledger
    words: int = 0  # whitespace-separated words of the kept documents (`cptkit.data.fertility`)
    spaceless: int = 0  # characters of scripts written without spaces, in their first characters
    sampled: int = 0  # the characters searched for those (`fertility.SCRIPT_SAMPLE_CHARS` of each)


@dataclass
class BatchProcessor:
    """Runs the document steps on a batch, then hashes and tokenizes the documents kept."""

    encoder: Encoder
    steps: Sequence[DocumentStep]
    chunker: Chunker

    def __call__(self, docs: list[Document]) -> Batch:
        dropped = Ledger()
        kept = list(run_steps(self.steps, docs, dropped))
        texts = [d.text for d in kept]
        data = [t.encode("utf-8") for t in texts]
        ids, starts = self.chunker.encode(self.encoder, texts)
        words, spaceless, sampled = count_words(texts)
        return Batch(
            texts=texts,
            wheres=[d.where for d in kept],
            hashes=[hashlib.blake2b(b, digest_size=16).digest() for b in data],
            num_bytes=[len(b) for b in data],
            ids=_flatten(ids),
            starts=_flatten(starts) if starts is not None else None,
            dropped=dropped,
            words=words,
            spaceless=spaceless,
            sampled=sampled,
        )


def _flatten(arrays: list[np.ndarray]) -> Flat:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.empty(0, np.int32)
    return values.astype(np.int32, copy=False), offsets


# A process pool's workers get their processor from the pool's initializer (inherited by fork, not
# pickled per batch). Set only inside those worker processes, never in the one that starts them.
_in_worker: BatchProcessor | None = None


def _start_worker(processor: BatchProcessor) -> None:
    global _in_worker
    _in_worker = processor


def _run_in_worker(docs: list[Document]) -> Batch:
    assert _in_worker is not None, "called outside a tokenizing worker process"
    return _in_worker(docs)


class Workers:
    """`processor` over batches of documents on `num_proc` threads or processes (threads when the
    tokenizer is a fast one, unless `kind` says otherwise); results come back in order."""

    def __init__(self, processor: BatchProcessor, num_proc: int, kind: PoolKind | None = None):
        self.processor = processor
        self.num_proc = num_proc
        self.kind = kind or ("threads" if processor.encoder.backend is not None else "processes")
        self.pool: Any = None
        if num_proc > 1 and self.kind == "threads":
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(num_proc, thread_name_prefix="cptkit-tokenize")
        elif num_proc > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            self.pool = ctx.Pool(num_proc, initializer=_start_worker, initargs=(processor,))

    def _submit(self, batch: list[Document]):
        if self.kind == "threads":
            return self.pool.submit(self.processor, batch).result
        return self.pool.apply_async(_run_in_worker, (batch,)).get

    def map(self, batches: Iterator[list[Document]]) -> Iterator[Batch]:
        if self.pool is None:
            for batch in batches:
                yield self.processor(batch)
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

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Near-duplicate detection: MinHash signatures of word 5-gram shingles, banded into an LSH index.

A document is a near duplicate when an earlier kept document (in config order, across all sources)
shares at least `threshold` of its shingles (Jaccard similarity, estimated as the fraction of equal
signature values). Candidates come from LSH: the signature is cut into `bands` bands of `rows`
values, and documents sharing a whole band are compared. With 128 values in 16 bands of 8 the
probability of becoming a candidate is 1 - (1 - s^8)^16: 0.95 at s = 0.8, 0.03 at s = 0.45.

Everything is deterministic across runs and machines: words are hashed with CRC-32 and shingles and
permutations with fixed 64-bit arithmetic, never with Python's per-process salted `hash` (the index files
bands under that hash, but compares their values, so it never decides what is kept).

Memory limit: the index holds every kept document's signature (512 bytes, in blocks of 16,384) and one
entry per band in a dict per band (a 64-bit key and the document's number: about 70 bytes each), so about
1.7 KB a kept document (measured: tests/unit/test_near_dedup.py), 1.7 GB for a million documents kept.
Unlike exact dedup (16 bytes a document) it is for corpora of up to a few million documents per machine.
"""

from __future__ import annotations

import multiprocessing
import re
import zlib
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from cptkit.data.steps import SourceDocs

_WORD = re.compile(r"\w+")
_SHINGLE = 5
_PERMUTATIONS = 128
_BANDS = 16
_BLOCK = 4096  # texts taken from the table at a time, so a source is never all in memory as str
_PARALLEL_FROM = 256  # texts in one call below which worker processes cost more than they save
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio): spreads shingle hashes


def _parameters() -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.Generator(np.random.PCG64(20241129))  # fixed: signatures never change between runs
    odd = gen.integers(1, 2**63, size=_PERMUTATIONS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    salt = gen.integers(0, 2**63, size=_PERMUTATIONS, dtype=np.uint64)
    return odd, salt


_ODD, _SALT = _parameters()


_CODES: dict[str, int] = {}


def _word_code(word: str) -> int:
    code = _CODES.get(word)
    if code is None:
        code = zlib.crc32(word.encode())
        if len(_CODES) < 1 << 20:  # a bounded cache of frequent words
            _CODES[word] = code
    return code


def shingle_hashes(text: str) -> np.ndarray:
    """64-bit hashes of the document's lower-cased word 5-grams (one shingle for shorter texts)."""
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(1, dtype=np.uint64)
    codes = np.fromiter((_word_code(w) for w in words), dtype=np.uint64, count=len(words))
    k = min(_SHINGLE, len(codes))
    with np.errstate(over="ignore"):  # wrap-around 64-bit arithmetic is the point
        h = np.zeros(len(codes) - k + 1, dtype=np.uint64)
        for i in range(k):
            h = h * _MIX + codes[i : len(codes) - k + 1 + i]
    return np.unique(h)


def signature(text: str) -> np.ndarray:
    """The MinHash signature: per permutation, the smallest multiply-shift hash over the shingles."""
    h = shingle_hashes(text)
    with np.errstate(over="ignore"):
        permuted = ((h[:, None] ^ _SALT[None, :]) * _ODD[None, :]) >> np.uint64(32)
    return permuted.min(axis=0).astype(np.uint32)


def band_keys(sig: np.ndarray) -> list[int]:
    """One 64-bit key per band of a signature (Python's hash of the band's bytes). Equal bands give equal
    keys; a key shared by unequal bands is told apart by comparing the values, so the salted hash decides
    only where an entry is kept, never which documents are compared."""
    data = sig.tobytes()
    width = len(data) // _BANDS
    return [hash(data[b * width : (b + 1) * width]) for b in range(_BANDS)]


_BLOCK_DOCS = 1 << 14  # signatures per block of the index (8 MiB): it grows a block at a time, never copied


class NearDeduper:
    """Corpus step: keeps an LSH index of the documents kept so far; drops the near duplicates of them.

    Signatures are computed on `workers` processes (they depend on the text alone); the index is
    built in document order on this one, so which copy is kept never depends on the workers."""

    def __init__(self, threshold: float = 0.8, enabled: bool = True, workers: int = 1):
        self.threshold = threshold
        self.enabled = enabled
        self.workers = workers
        self.pool: Any = None
        self.rows = _PERMUTATIONS // _BANDS
        # band key -> the kept document (its number) or documents whose band has that key
        self.buckets: list[dict[int, int | list[int]]] = [{} for _ in range(_BANDS)]
        self.blocks: list[np.ndarray] = []  # the kept documents' signatures, _BLOCK_DOCS a block
        self.count = 0

    def _signatures(self, texts: list[str]) -> Iterable[np.ndarray]:
        if self.workers <= 1 or len(texts) < _PARALLEL_FROM:
            return map(signature, texts)
        if self.pool is None:  # spawn: a clean interpreter that imports numpy, not the caller's threads
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self.pool.map(signature, texts, chunksize=max(1, len(texts) // (4 * self.workers)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def _signature(self, i: int) -> np.ndarray:
        return self.blocks[i // _BLOCK_DOCS][i % _BLOCK_DOCS]

    def _candidates(self, sig: np.ndarray, keys: list[int]) -> list[int]:
        """The kept documents that share at least one whole band with `sig`."""
        found: set[int] = set()
        for b, key in enumerate(keys):
            hit = self.buckets[b].get(key)
            if hit is None:
                continue
            lo, hi = b * self.rows, (b + 1) * self.rows
            for i in (hit,) if isinstance(hit, int) else hit:
                if i not in found and np.array_equal(self._signature(i)[lo:hi], sig[lo:hi]):
                    found.add(i)
        return sorted(found)

    def is_near_duplicate(self, sig: np.ndarray) -> bool:
        keys = band_keys(sig)
        candidates = self._candidates(sig, keys)
        if candidates:
            shared = np.mean(np.stack([self._signature(i) for i in candidates]) == sig[None, :], axis=1)
            if bool((shared >= self.threshold).any()):
                return True
        index = self.count
        if index % _BLOCK_DOCS == 0:
            self.blocks.append(np.empty((_BLOCK_DOCS, _PERMUTATIONS), dtype=np.uint32))
        self.blocks[-1][index % _BLOCK_DOCS] = sig
        self.count += 1
        for b, key in enumerate(keys):
            hit = self.buckets[b].get(key)
            if hit is None:
                self.buckets[b][key] = index
            elif isinstance(hit, int):
                self.buckets[b][key] = [hit, index]
            else:
                hit.append(index)
        return False

    def keep_mask(self, texts: Iterable[str]) -> np.ndarray:
        """False for each text that nearly duplicates one kept before (all True when disabled)."""
        texts = list(texts)
        if not self.enabled:
            return np.ones(len(texts), dtype=bool)
        return np.fromiter(
            (not self.is_near_duplicate(sig) for sig in self._signatures(texts)), dtype=bool, count=len(texts)
        )

    def select(self, source: SourceDocs, docs: np.ndarray) -> np.ndarray:
        """The documents of `docs` that nearly duplicate no document kept before; their texts are read a
        block at a time."""
        if not self.enabled:
            return docs
        keep = np.ones(len(docs), dtype=bool)
        for lo in range(0, len(docs), _BLOCK):
            block = docs[lo : lo + _BLOCK]
            keep[lo : lo + len(block)] = self.keep_mask(source.take("text", block).to_pylist())
        return docs[keep]

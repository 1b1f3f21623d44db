"""Chunking: cut each document's ids into segments of at most one training row, losing nothing.

Every strategy returns segments as (document, offset, length) that tile each document's ids exactly
once: `packing` cuts a document only where it is longer than `seq_length`; `tokens` cuts fixed
windows of `chunk_tokens`; `sentences` groups whole sentences up to `chunk_tokens` (a longer sentence
is cut into windows); `chars` keeps each character chunk (already its own tokenized document) whole,
cut into windows only if it exceeds `seq_length`.
"""

from __future__ import annotations

import numpy as np


def windows(lengths: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut documents of `lengths` tokens into consecutive windows of `size` (the last one shorter)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    pieces = -(-lengths // size)
    doc = np.repeat(np.arange(len(lengths)), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    offset = (np.arange(len(doc)) - first) * size
    return doc, offset, np.minimum(size, lengths[doc] - offset)


def _units(lengths: np.ndarray, starts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Units (sentences or char chunks) of each document from their start indices."""
    docs, offs, lens = [], [], []
    for d, (n, s) in enumerate(zip(lengths, starts, strict=True)):
        s = np.asarray(s, dtype=np.int64)
        if len(s) == 0 or s[0] != 0:
            s = np.concatenate([[0], s])
        ends = np.append(s[1:], n)
        docs.append(np.full(len(s), d))
        offs.append(s)
        lens.append(ends - s)
    if not docs:
        empty = np.empty(0, np.int64)
        return empty, empty, empty
    return np.concatenate(docs), np.concatenate(offs), np.concatenate(lens)


def _split_long(doc, off, length, size):
    """Cut units longer than `size` into windows of `size`."""
    wdoc, woff, wlen = windows(length, size)
    return doc[wdoc], off[wdoc] + woff, wlen


def _group(doc, off, length, budget):
    """Merge consecutive units of the same document while they fit in `budget` tokens."""
    out_doc, out_off, out_len = [], [], []
    cur_doc, cur_off, cur_len = -1, 0, 0
    for d, o, n in zip(doc.tolist(), off.tolist(), length.tolist(), strict=True):
        if d == cur_doc and cur_len + n <= budget:
            cur_len += n
            continue
        if cur_doc >= 0:
            out_doc.append(cur_doc), out_off.append(cur_off), out_len.append(cur_len)
        cur_doc, cur_off, cur_len = d, o, n
    if cur_doc >= 0:
        out_doc.append(cur_doc), out_off.append(cur_off), out_len.append(cur_len)
    return (np.asarray(out_doc, np.int64), np.asarray(out_off, np.int64), np.asarray(out_len, np.int64))


def segments(
    lengths: np.ndarray,
    starts: list[np.ndarray] | None,
    chunking: str,
    seq_length: int,
    chunk_tokens: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document index, offset, length) of every segment; together they tile every document exactly."""
    lengths = np.asarray(lengths, dtype=np.int64)
    budget = min(chunk_tokens or seq_length, seq_length)
    if chunking == "packing":
        return windows(lengths, seq_length)
    if chunking == "tokens":
        return windows(lengths, budget)
    if starts is None:
        raise ValueError(f"chunking {chunking!r} needs unit starts from tokenization")
    doc, off, length = _units(lengths, starts)
    if chunking == "chars":
        return _split_long(doc, off, length, seq_length)
    if chunking == "sentences":
        return _group(*_split_long(doc, off, length, budget), budget)
    raise ValueError(f"unknown chunking {chunking!r}")

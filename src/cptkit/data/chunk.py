"""Chunking: cut each document's ids into segments of at most one training row, losing nothing.

A strategy is a `Chunker`: it says what tokenization must record for it (`records`), cuts the cached
ids into segments (`segments`), and says whether held-out documents must be tokenized again whole
(`heldout_whole`). `CHUNKERS` is the one place strategies are registered (`data.chunking` is one of its
names); a new strategy is one class with `@register_chunker`.

Every strategy returns segments as (document, offset, length) that tile each document's ids exactly
once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

Segments = tuple[np.ndarray, np.ndarray, np.ndarray]  # (document index, offset, length) per segment

# What one tokenizer call sees and what is kept besides the ids: whole documents; whole documents and
# the token index where each sentence starts; or each `chunk_chars` characters tokenized as its own
# document, with the index where each chunk's ids start.
Records = Literal["documents", "sentences", "chars"]


@dataclass(frozen=True)
class Chunker:
    """A chunking strategy with the data settings it reads (set from the `data` section)."""

    seq_length: int
    chunk_tokens: int | None = None
    chunk_chars: int = 512

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for the config's help
    records: ClassVar[Records] = "documents"
    # the cached ids are not those of whole documents (char chunks): held-out documents are tokenized again
    heldout_whole: ClassVar[bool] = False

    @classmethod
    def from_config(cls, data: Any) -> Chunker:
        """The chunker `data.chunking` names, with the settings of the `data` section."""
        return CHUNKERS[data.chunking](data.seq_length, data.chunk_tokens, data.chunk_chars)

    @property
    def budget(self) -> int:
        """Tokens per chunk: `chunk_tokens`, at most `seq_length`."""
        return min(self.chunk_tokens or self.seq_length, self.seq_length)

    @property
    def unit(self) -> str:
        """What one tokenizer call sees, as recorded in the cache key of a tokenized shard."""
        return {"documents": "document", "sentences": "sentences"}.get(
            self.records, f"chars:{self.chunk_chars}"
        )

    def encode(self, encoder: Any, texts: list[str]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Ids of each text (ending in EOS) and, when `records` asks for them, its unit starts."""
        if self.records == "sentences":
            return encoder.encode_sentences(texts)
        if self.records == "chars":
            return encoder.encode_chunks(texts, self.chunk_chars)
        return encoder.encode(texts), None

    def segments(self, lengths: np.ndarray, starts: list[np.ndarray] | None) -> Segments:
        """(document index, offset, length) of every segment of documents of `lengths` tokens, given
        the unit starts tokenization recorded (None for `records = "documents"`)."""
        raise NotImplementedError


CHUNKERS: dict[str, type[Chunker]] = {}


def register_chunker(cls: type[Chunker]) -> type[Chunker]:
    """Make a chunking strategy selectable as `data.chunking: <cls.name>`."""
    if not (isinstance(cls, type) and issubclass(cls, Chunker)) or not getattr(cls, "name", ""):
        raise ValueError(f"{cls!r}: a chunker is a Chunker subclass with a name")
    CHUNKERS[cls.name] = cls
    return cls


def describe_chunkers() -> str:
    """`name: summary` of every registered strategy (the help of `data.chunking`)."""
    return "; ".join(f"{name}: {cls.summary}" for name, cls in CHUNKERS.items())


@register_chunker
class Packing(Chunker):
    name = "packing"
    summary = "whole documents packed best-fit (long ones split, never truncated)"

    def segments(self, lengths, starts):
        return windows(lengths, self.seq_length)


@register_chunker
class Tokens(Chunker):
    name = "tokens"
    summary = "fixed token windows of chunk_tokens"

    def segments(self, lengths, starts):
        return windows(lengths, self.budget)


@register_chunker
class Sentences(Chunker):
    name = "sentences"
    summary = "sentence/paragraph chunks up to a token budget (a longer sentence is cut into windows)"
    records = "sentences"

    def segments(self, lengths, starts):
        return group(*split_long(*units(lengths, _needed(starts, self)), self.budget), self.budget)


@register_chunker
class Chars(Chunker):
    name = "chars"
    summary = "the seed's fixed character chunks (chunk_chars), each tokenized as its own document"
    records = "chars"
    heldout_whole = True

    def segments(self, lengths, starts):
        return split_long(*units(lengths, _needed(starts, self)), self.seq_length)


# --- the pieces strategies are made of ---


def windows(lengths: np.ndarray, size: int) -> Segments:
    """Cut documents of `lengths` tokens into consecutive windows of `size` (the last one shorter)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    pieces = -(-lengths // size)
    doc = np.repeat(np.arange(len(lengths)), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    offset = (np.arange(len(doc)) - first) * size
    return doc, offset, np.minimum(size, lengths[doc] - offset)


def _needed(starts: list[np.ndarray] | None, chunker: Chunker) -> list[np.ndarray]:
    if starts is None:
        raise ValueError(f"chunking {chunker.name!r} needs unit starts from tokenization")
    return starts


def units(lengths: np.ndarray, starts: list[np.ndarray]) -> Segments:
    """Units (sentences or char chunks) of each document from their start indices."""
    docs, offs, lens = [], [], []
    for d, (n, s) in enumerate(zip(np.asarray(lengths, dtype=np.int64), starts, strict=True)):
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


def split_long(doc: np.ndarray, off: np.ndarray, length: np.ndarray, size: int) -> Segments:
    """Cut units longer than `size` into windows of `size`."""
    wdoc, woff, wlen = windows(length, size)
    return doc[wdoc], off[wdoc] + woff, wlen


def group(doc: np.ndarray, off: np.ndarray, length: np.ndarray, budget: int) -> Segments:
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

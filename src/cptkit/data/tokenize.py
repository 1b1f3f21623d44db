"""Tokenize whole documents with any HF tokenizer: BOS as the tokenizer adds it, EOS at each real end.

A document is tokenized in one piece (never pre-cut into windows), so the ids are exactly those the
model would see reading the document; chunking happens afterwards on the ids. With
`chunking: chars` each fixed-size character chunk is its own document (the seed's recipe) and gets
its own BOS/EOS; with `chunking: sentences` the token index where each sentence starts is kept.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from cptkit.data.manifest import tokenizer_fingerprint
from cptkit.errors import CptkitError

log = logging.getLogger(__name__)

# A sentence ends at . ! ? (or their CJK forms) followed by space; a paragraph at a blank line.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])|\n\s*\n")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, local_files_only: bool = False) -> Any:
    """AutoTokenizer from a folder or hub name (`local_files_only`: the folder or the HF cache, never the
    network), with a message that says what to do when it fails."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, local_files_only=local_files_only
        )
    except Exception as e:  # transformers raises OSError, ValueError, ... depending on what is missing
        hint = (
            " (set data.trust_remote_code: true if you trust its code)"
            if "trust_remote_code" in str(e)
            else ""
        )
        raise CptkitError(f"data.tokenizer: cannot load {name_or_path!r}: {e}{hint}") from None
    if tok.eos_token_id is None:
        raise CptkitError(
            f"data.tokenizer: {name_or_path!r} has no EOS token; documents could not be separated"
        )
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # a tokenizer.json may carry truncation; documents must never be cut
        backend.no_truncation()
        backend.no_padding()
    return tok


def describe(tok: Any, name_or_path: str) -> dict[str, Any]:
    """The manifest's `tokenizer` entry."""
    return {
        "name_or_path": name_or_path,
        "fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "class": type(tok).__name__,
    }


class Encoder:
    """Turns texts into id arrays ending in EOS; the one place the tokenizer is called."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.eos = tok.eos_token_id
        self.backend = getattr(tok, "backend_tokenizer", None)
        probe = self._raw(["a"])[0]
        self.appends_eos = bool(probe) and probe[-1] == self.eos  # a tokenizer that adds EOS itself

    def _raw(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=True)]
        return self.tok(texts, add_special_tokens=True)["input_ids"]

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Ids of each text, BOS as the tokenizer adds it, EOS appended once."""
        out = []
        for ids in self._raw(texts):
            arr = np.empty(len(ids) + (not self.appends_eos), dtype=np.int32)
            arr[: len(ids)] = ids
            if not self.appends_eos:
                arr[-1] = self.eos
            out.append(arr)
        return out

    def encode_chunks(self, texts: list[str], chunk_chars: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each text cut into `chunk_chars` characters, each chunk tokenized as its own document.

        Returns per text the concatenated ids and the index where each chunk's ids start."""
        pieces, owners = [], []
        for i, text in enumerate(texts):
            for start in range(0, len(text), chunk_chars):
                pieces.append(text[start : start + chunk_chars])
                owners.append(i)
        encoded = self.encode(pieces)
        ids: list[list[np.ndarray]] = [[] for _ in texts]
        for owner, arr in zip(owners, encoded, strict=True):
            ids[owner].append(arr)
        flat = [np.concatenate(parts) if parts else np.empty(0, np.int32) for parts in ids]
        starts = [
            np.concatenate([[0], np.cumsum([len(p) for p in parts])[:-1]]).astype(np.int32) for parts in ids
        ]
        return flat, starts

    def encode_sentences(self, texts: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Ids of each whole text, and the token index where each sentence or paragraph starts."""
        if self.backend is None:
            raise CptkitError("data.chunking: sentences needs a fast (Rust) tokenizer for character offsets")
        out_ids, out_starts = [], []
        for text, enc in zip(texts, self.backend.encode_batch(texts, add_special_tokens=True), strict=True):
            ids = enc.ids
            arr = np.empty(len(ids) + (not self.appends_eos), dtype=np.int32)
            arr[: len(ids)] = ids
            if not self.appends_eos:
                arr[-1] = self.eos
            token_starts = np.fromiter((s for s, _ in enc.offsets), dtype=np.int64, count=len(ids))
            # special tokens have offset (0, 0): make starts non-decreasing before searching
            token_starts = np.maximum.accumulate(token_starts)
            chars = [m.end() for m in _SENTENCE_END.finditer(text)]
            # a sentence starts at the token holding its first character (with byte-level BPE that
            # token also carries the space before it)
            first = np.searchsorted(token_starts, chars, side="right") - 1
            starts = np.unique(np.concatenate([[0], np.maximum(first, 1)]))
            out_ids.append(arr)
            out_starts.append(starts[starts < len(arr)].astype(np.int32))
        return out_ids, out_starts

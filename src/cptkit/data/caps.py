"""Per-source caps (`max_documents`, `max_tokens`): take the first documents of a huge source without
cutting its files by hand.

Documents count in reading order after the filters, before dedup and the held-out split; they are
taken whole: the first `max_documents` of them, and of those the longest run from the start whose
tokens add up to at most `max_tokens`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def leading_documents(lengths: np.ndarray, max_documents: int | None, max_tokens: int | None) -> int:
    """How many documents, from the first, a source keeps under its caps (`lengths`: each one's tokens)."""
    n = len(lengths) if max_documents is None else min(len(lengths), max_documents)
    if max_tokens is not None and n:
        total = np.cumsum(np.asarray(lengths[:n], dtype=np.int64))
        n = int(np.searchsorted(total, max_tokens, side="right"))
    return n


@dataclass(frozen=True)
class Cap:
    """A source's caps, as tokenizing checks them: once the documents kept so far reach either one, the
    leading documents are all read (what follows them is never kept), so reading can stop."""

    max_documents: int | None = None
    max_tokens: int | None = None

    @classmethod
    def of(cls, source: Any) -> Cap | None:
        """The caps of a `SourceConfig`; None for a source without any."""
        if source.max_documents is None and source.max_tokens is None:
            return None
        return cls(source.max_documents, source.max_tokens)

    def reached(self, documents: int, tokens: int) -> bool:
        """True once `documents` kept documents of `tokens` tokens, read from the start, hold every
        document `leading_documents` keeps."""
        return (self.max_documents is not None and documents >= self.max_documents) or (
            self.max_tokens is not None and tokens >= self.max_tokens
        )

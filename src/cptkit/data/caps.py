"""Per-source caps (`max_documents`, `max_tokens`): take the first documents of a huge source without
cutting its files by hand.

Documents count in reading order after the filters, before dedup and the held-out split; they are
taken whole: the first `max_documents` of them, and of those the longest run from the start whose
tokens add up to at most `max_tokens`."""

from __future__ import annotations

import numpy as np


def leading_documents(lengths: np.ndarray, max_documents: int | None, max_tokens: int | None) -> int:
    """How many documents, from the first, a source keeps under its caps (`lengths`: each one's tokens)."""
    n = len(lengths) if max_documents is None else min(len(lengths), max_documents)
    if max_tokens is not None and n:
        total = np.cumsum(np.asarray(lengths[:n], dtype=np.int64))
        n = int(np.searchsorted(total, max_tokens, side="right"))
    return n

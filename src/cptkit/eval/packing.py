"""Documents -> packed rows for evaluation, without any token seeing another document.

A document of n tokens has n - 1 predicted tokens (its first token has no context). One longer than
`seq_length` is cut into windows of `seq_length` that overlap by one token: each window is a fresh
context (positions restart at 0), its first token only conditions, so every predicted token of the
document is scored exactly once and never with more than `seq_length - 1` tokens of context.
Windows are packed best-fit into rows; `position_ids` restart at every window, there is no
attention_mask (transformers then keeps attention inside each window), and labels are -100 at each
window's first token and on padding (`cptkit.train.collator.padded_batch`, as in training).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cptkit.data.pack import best_fit_pack
from cptkit.train.collator import padded_batch


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, length)
    position_ids: torch.Tensor
    labels: torch.Tensor  # -100 where nothing is predicted
    doc_index: torch.Tensor  # which document each token belongs to, -1 on padding


def windows(ids: list[int], seq_length: int) -> list[list[int]]:
    """Cut a document into windows of at most seq_length tokens, overlapping by one token."""
    if seq_length < 2:
        raise ValueError("seq_length must be at least 2")
    if len(ids) <= seq_length:
        return [list(ids)]
    step = seq_length - 1
    return [list(ids[start : start + seq_length]) for start in range(0, len(ids) - 1, step)]


def packed_rows(docs: list[list[int]], seq_length: int) -> list[dict[str, list[int]]]:
    """Every document's windows packed best-fit into rows `{input_ids, position_ids, doc_index}` of at
    most seq_length tokens, longest rows first (rows of similar length then share a batch: less padding)."""
    segments = [(d, w) for d, ids in enumerate(docs) for w in windows(ids, seq_length) if len(w) >= 2]
    groups = best_fit_pack([len(w) for _, w in segments], seq_length)
    groups.sort(key=lambda g: -sum(len(segments[i][1]) for i in g))
    rows = []
    for group in groups:
        row: dict[str, list[int]] = {"input_ids": [], "position_ids": [], "doc_index": []}
        for i in group:
            d, w = segments[i]
            row["input_ids"] += w
            row["position_ids"] += range(len(w))
            row["doc_index"] += [d] * len(w)
        rows.append(row)
    return rows


def batches_of(rows: Sequence[Mapping[str, Any]], batch_size: int, pad_id: int = 0) -> list[Batch]:
    """Packed rows, batch_size at a time, as Batches. Rows without `doc_index` (SFT's labelled rows)
    count as one document each, numbered in order."""
    batches = []
    for start in range(0, len(rows), batch_size):
        group = [
            r if "doc_index" in r else {**r, "doc_index": [start + k] * len(r["input_ids"])}
            for k, r in enumerate(rows[start : start + batch_size])
        ]
        batches.append(Batch(**padded_batch(group, pad_id)))
    return batches


def packed_batches(docs: list[list[int]], seq_length: int, batch_size: int, pad_id: int = 0) -> list[Batch]:
    """Every document's windows packed into rows of seq_length, batch_size rows per Batch."""
    return batches_of(packed_rows(docs, seq_length), batch_size, pad_id)

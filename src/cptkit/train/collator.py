"""Batches of packed rows: labels that never cross a document boundary and never land on padding.

`padded_batch` is the one place a list of packed rows becomes tensors; the training collator and
eval's scorer (`cptkit.eval.packing`) both use it, so a token is labelled the same way in both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cptkit.model.attention import varlen_metadata

IGNORE_INDEX = -100


def padded_batch(
    rows: Sequence[Mapping[str, Any]], pad_token_id: int, width: int | None = None
) -> dict[str, torch.Tensor]:
    """Rows `{input_ids, position_ids}` (optionally `labels`, `doc_index`, `source_ids`) as padded tensors.

    position_ids restart at 0 at every segment (a document, a window, an SFT example). Labels are the
    row's own `labels` when it has them (SFT's prompt mask), else its input_ids; either way -100 at each
    segment's first token, so no segment is asked to predict the first token of the next, and -100 on
    padding. Padding continues the position count of the row's last segment, so it never looks like a
    new segment. `doc_index`, when rows carry it, is padded with -1. `source_ids`, when rows carry them
    (one per segment, as prepared), become one per token: each token gets its segment's id, padding -1.
    `width` (default: the longest row) must hold every row.
    """
    lengths = [len(r["input_ids"]) for r in rows]
    width = width or max(lengths)
    if width < max(lengths):
        raise ValueError(f"width {width} is shorter than the longest row ({max(lengths)})")
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    with_docs = "doc_index" in rows[0]
    doc_index = torch.full(shape, -1, dtype=torch.long) if with_docs else None
    with_sources = "source_ids" in rows[0]
    source_ids = torch.full(shape, -1, dtype=torch.long) if with_sources else None
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
        pos = torch.as_tensor(row["position_ids"], dtype=torch.long)
        input_ids[i, :n] = ids
        position_ids[i, :n] = pos
        if n < width:  # padding: keep counting, so the kernels see one longer last segment
            last = int(pos[-1]) if n else -1
            position_ids[i, n:] = torch.arange(last + 1, last + 1 + width - n)
        own = torch.as_tensor(row["labels"], dtype=torch.long) if "labels" in row else ids
        labels[i, :n] = torch.where(pos == 0, IGNORE_INDEX, own)
        if doc_index is not None:
            doc_index[i, :n] = torch.as_tensor(row["doc_index"], dtype=torch.long)
        if source_ids is not None:
            source_ids[i, :n] = per_token_sources(row["source_ids"], pos)
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    if doc_index is not None:
        batch["doc_index"] = doc_index
    if source_ids is not None:
        batch["source_ids"] = source_ids
    return batch


def per_token_sources(segment_sources: Sequence[int], position_ids: torch.Tensor) -> torch.Tensor:
    """One source id per token from one per segment: segment k starts at the k-th position id 0."""
    starts = position_ids == 0
    sources = torch.as_tensor(segment_sources, dtype=torch.long)
    if len(position_ids) and (not bool(starts[0]) or int(starts.sum()) != len(sources)):
        raise ValueError(
            f"a row with {int(starts.sum())} segment start(s) (position id 0, the first at the row's start) "
            f"has {len(sources)} source id(s)"
        )
    return sources[torch.cumsum(starts.long(), 0) - 1]


class PackedCollator:
    """Turn rows `{input_ids, position_ids}` (and `labels`, for SFT; `source_ids`, for prepared rows that
    carry them) into `{input_ids, position_ids, labels[, source_ids]}` with `padded_batch`.

    No attention_mask is returned on purpose: with position_ids that restart at 0 at every document,
    the attention kernels keep each document to itself (see `cptkit.model.attention`). SFT rows carry
    their labels (-100 on system and prompt tokens); the first token of every example and the padding
    are still -100, so no loss crosses an example boundary.

    `pad_to_multiple_of` rounds the batch length up (tensor cores like multiples of 8 or 64).
    `varlen_metadata` (for cptkit's varlen attention) adds the batch's document boundaries
    (`cptkit.model.attention.VARLEN_KEYS`), computed here on the CPU so no layer syncs to derive them.
    """

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int | None = None,
        max_length: int | None = None,
        varlen_metadata: bool = False,
    ):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        self.varlen_metadata = varlen_metadata

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        longest = max(len(r["input_ids"]) for r in rows)
        width = longest
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
            if self.max_length:
                width = min(width, max(self.max_length, longest))
        batch = padded_batch(rows, self.pad_token_id, width)
        if self.varlen_metadata:
            batch.update(varlen_metadata(batch["position_ids"]))
        return batch

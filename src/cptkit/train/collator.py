"""Batches of packed rows: labels that never cross a document boundary and never land on padding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


class PackedCollator:
    """Turn rows `{input_ids, position_ids}` into `{input_ids, position_ids, labels}`.

    No attention_mask is returned on purpose: with position_ids that restart at 0 at every document,
    the attention kernels keep each document to itself (see `cptkit.model.attention`). Labels are -100
    on padding and on every document's first token, so the last token of one document is never asked
    to predict the first token of the next. Padding continues the position count of the row's last
    document, so it never looks like a new document, and its label is -100.

    `pad_to_multiple_of` rounds the batch length up (tensor cores like multiples of 8 or 64).
    """

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: int | None = None, max_length: int | None = None
    ):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(r["input_ids"]) for r in rows]
        width = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
            if self.max_length:
                width = min(width, max(self.max_length, max(lengths)))
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            pos = torch.as_tensor(row["position_ids"], dtype=torch.long)
            input_ids[i, :n] = ids
            position_ids[i, :n] = pos
            if n < width:  # padding: keep counting, so the kernels see one longer last document
                last = int(pos[-1]) if n else -1
                position_ids[i, n:] = torch.arange(last + 1, last + 1 + width - n)
            labels[i, :n] = torch.where(pos == 0, IGNORE_INDEX, ids)
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def count_trained_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss in a batch (the model predicts each of them from the one before)."""
    return int((labels != IGNORE_INDEX).sum())

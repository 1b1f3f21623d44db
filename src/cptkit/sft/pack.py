"""Rendered examples -> training rows in the prepared-dataset row format, plus a `labels` column.

Rows are `{input_ids, position_ids, labels}`: position_ids restart at 0 for every example, so the
attention kernels keep each example to itself exactly as they keep CPT documents apart, and labels
carry the prompt mask. Without packing, each example is its own row.
"""

from __future__ import annotations

from cptkit.data.pack import best_fit_pack
from cptkit.sft.render import Example


def pack_examples(
    examples: list[Example], seq_length: int, packing: bool = True
) -> list[dict[str, list[int]]]:
    """Group examples into rows of at most seq_length tokens (best-fit decreasing when packing)."""
    if packing:
        groups = best_fit_pack([len(e.input_ids) for e in examples], seq_length)
    else:
        groups = [[i] for i in range(len(examples))]
    rows = []
    for group in groups:
        row: dict[str, list[int]] = {"input_ids": [], "position_ids": [], "labels": []}
        for i in group:
            example = examples[i]
            row["input_ids"] += example.input_ids
            row["labels"] += example.labels
            row["position_ids"] += list(range(len(example.input_ids)))
        rows.append(row)
    return rows

"""Documents -> packed rows for evaluation, without any token seeing another document.

A document of n tokens has n - 1 predicted tokens (its first token has no context). One longer than
`seq_length` is cut into windows of `seq_length` that overlap by one token: each window is a fresh
context (positions restart at 0), its first token only conditions, so every predicted token of the
document is scored exactly once and never with more than `seq_length - 1` tokens of context.
Windows are packed best-fit into rows; `position_ids` restart at every window, there is no
attention_mask (transformers then keeps attention inside each window), and labels are -100 at each
window's first token and on padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most `capacity` tokens, best-fit decreasing."""
    try:
        from cptkit.data.pack import best_fit_pack
    except ImportError:
        best_fit_pack = None
    if best_fit_pack is not None:
        return best_fit_pack(lengths, capacity)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: free[r])
            rows[r].append(i)
            free[r] -= lengths[i]
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def packed_batches(docs: list[list[int]], seq_length: int, batch_size: int, pad_id: int = 0) -> list[Batch]:
    """Every document's windows packed into rows of seq_length, batch_size rows per Batch."""
    segments = [(d, w) for d, ids in enumerate(docs) for w in windows(ids, seq_length) if len(w) >= 2]
    rows = best_fit([len(w) for _, w in segments], seq_length)
    rows.sort(
        key=lambda r: -sum(len(segments[i][1]) for i in r)
    )  # similar lengths share a batch: less padding
    batches = []
    for start in range(0, len(rows), batch_size):
        group = rows[start : start + batch_size]
        width = max(sum(len(segments[i][1]) for i in row) for row in group)
        ids, pos, labels, docs_of = [], [], [], []
        for row in group:
            r_ids, r_pos, r_lab, r_doc = [], [], [], []
            for i in row:
                d, w = segments[i]
                r_ids += w
                r_pos += range(len(w))
                r_lab += [-100] + w[1:]
                r_doc += [d] * len(w)
            pad = width - len(r_ids)
            ids.append(r_ids + [pad_id] * pad)
            pos.append(r_pos + list(range(pad)))
            labels.append(r_lab + [-100] * pad)
            docs_of.append(r_doc + [-1] * pad)
        batches.append(Batch(*(torch.tensor(x, dtype=torch.long) for x in (ids, pos, labels, docs_of))))
    return batches

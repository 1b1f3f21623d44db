"""Held-out evaluation during training: loss, perplexity and bits per byte on each held-out set, so
both the gain on the domain and any forgetting of general text show while the run goes on.

The numbers come from `cptkit eval`'s scorer (`cptkit.eval.perplexity`): the same windows overlapping
by one token, every predicted token scored once. Only the amount differs: training scores the first
documents of each set up to `train.eval_max_tokens`, `cptkit eval` all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cptkit.eval.packing import Batch, batches_of, packed_rows
from cptkit.eval.perplexity import score_batches, summarize

if TYPE_CHECKING:
    from cptkit.data.prepared import Prepared

log = logging.getLogger(__name__)


@dataclass
class HeldoutSet:
    """One evaluation set as packed rows `{input_ids, position_ids[, labels][, doc_index]}`.

    `num_bytes` is the UTF-8 size of the text the rows score (None: unknown, no bits per byte)."""

    name: str
    role: str
    rows: list[dict[str, list[int]]]
    num_documents: int
    num_bytes: int | None = None

    @classmethod
    def from_documents(
        cls, name: str, role: str, documents: list[list[int]], seq_length: int, num_bytes: int | None
    ) -> HeldoutSet:
        """Token documents, cut into windows and packed the way `cptkit eval` does it."""
        return cls(name, role, packed_rows(documents, seq_length), len(documents), num_bytes)

    @classmethod
    def from_rows(cls, name: str, role: str, rows: Sequence[dict[str, list[int]]]) -> HeldoutSet:
        """Rows already packed with their own labels (SFT: -100 on prompts); each row counts as a document."""
        return cls(name, role, list(rows), len(rows))

    def batches(self, batch_size: int, pad_id: int) -> list[Batch]:
        return batches_of(self.rows, batch_size, pad_id)


def load_heldout_sets(prepared: Prepared, seq_length: int, max_tokens: int) -> list[HeldoutSet]:
    """Each held-out set of a prepared dataset: whole documents, in order, up to max_tokens.

    Whole documents, so that the set's bytes are exactly the bytes of what is scored (the prepared
    sets record `num_bytes` per document). A document longer than what is left of the budget is passed
    over and the later ones still fill it, so one long document does not leave the set nearly empty.
    A set none of whose documents fits keeps its first document cut at max_tokens, and has no bits per
    byte."""
    sets = []
    for name, info in prepared.heldout.items():
        if not info.documents:
            continue
        data = prepared.heldout_set(name)
        documents, num_bytes, total = [], 0, 0
        for ids, size in zip(data["input_ids"], data["num_bytes"], strict=True):
            if total + len(ids) <= max_tokens:
                documents.append(list(ids))
                num_bytes += size
                total += len(ids)
        if not documents:  # every document alone is longer than the budget
            documents, num_bytes = [list(data[0]["input_ids"])[:max_tokens]], None
        heldout = HeldoutSet.from_documents(name, info.role, documents, seq_length, num_bytes)
        if heldout.rows:  # some document has a token to predict
            sets.append(heldout)
    return sets


@torch.no_grad()
def evaluate_set(model: Any, heldout: HeldoutSet, batch_size: int, pad_id: int) -> dict[str, Any]:
    """Loss per predicted token over the set, its perplexity and bits per byte, and each document's
    summed nats and predicted tokens (`doc_nats`, `doc_tokens`: the bootstrap interval of a change
    against the base, see `cptkit.train.budget`)."""
    was_training = model.training
    model.eval()
    try:
        scores = score_batches(model, heldout.batches(batch_size, pad_id), heldout.num_documents)
    finally:
        if was_training:
            model.train()
    nats, tokens = scores.total_nats, scores.total_tokens
    numbers = summarize(nats, tokens, heldout.num_bytes or 0)
    return {
        "set": heldout.name,
        "role": heldout.role,
        "loss": numbers["loss"],
        "perplexity": numbers["perplexity"],
        "bits_per_byte": numbers["bits_per_byte"] if heldout.num_bytes else None,
        "tokens": tokens,
        "doc_nats": [round(x, 4) for x in scores.nats],  # as metrics.jsonl keeps them, so a resume reads
        "doc_tokens": scores.tokens,  # back exactly what the run judged
    }

"""Held-out evaluation during training: loss and perplexity on each held-out set, so both the gain on
the domain and any forgetting of general text show while the run goes on."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cptkit.train.collator import IGNORE_INDEX, PackedCollator

if TYPE_CHECKING:
    from cptkit.data.prepared import Prepared

log = logging.getLogger(__name__)


@dataclass
class HeldoutSet:
    """One evaluation set, already packed into rows `{input_ids, position_ids}`."""

    name: str
    role: str
    rows: list[dict[str, list[int]]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)


def pack_documents(documents: list[list[int]], seq_length: int) -> list[dict[str, list[int]]]:
    """Pack token lists into rows of at most seq_length, in order (next fit). A document longer than a
    row is cut into windows, each evaluated on its own; the full-context numbers are `cptkit eval`'s."""
    pieces = [doc[i : i + seq_length] for doc in documents for i in range(0, len(doc), seq_length)]
    rows: list[dict[str, list[int]]] = []
    ids: list[int] = []
    pos: list[int] = []
    for piece in pieces:
        if len(ids) + len(piece) > seq_length:
            rows.append({"input_ids": ids, "position_ids": pos})
            ids, pos = [], []
        ids += piece
        pos += list(range(len(piece)))
    if ids:
        rows.append({"input_ids": ids, "position_ids": pos})
    return rows


def load_heldout_sets(prepared: Prepared, seq_length: int, max_tokens: int) -> list[HeldoutSet]:
    """Each held-out set of a prepared dataset, its first documents up to max_tokens, packed."""
    sets = []
    for name, info in prepared.heldout.items():
        if not info.documents:
            continue
        data = prepared.heldout_set(name)
        documents, total = [], 0
        for ids in data["input_ids"] if len(data) else []:
            if total >= max_tokens:
                break
            ids = list(ids)[: max_tokens - total]
            if len(ids) > 1:
                documents.append(ids)
                total += len(ids)
        if documents:
            sets.append(HeldoutSet(name, info.role, pack_documents(documents, seq_length)))
    return sets


@torch.no_grad()
def evaluate_set(
    model: Any, heldout: HeldoutSet, collator: PackedCollator, batch_size: int
) -> dict[str, Any]:
    """Mean loss per predicted token over the set, and its perplexity."""
    was_training = model.training
    model.eval()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    loss_sum, count = 0.0, 0
    for start in range(0, len(heldout.rows), batch_size):
        batch = collator(heldout.rows[start : start + batch_size])
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if n == 0:
            continue
        out = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
        loss_sum += float(out.loss) * n
        count += n
    if was_training:
        model.train()
    loss = loss_sum / max(count, 1)
    return {
        "set": heldout.name,
        "role": heldout.role,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": count,
    }

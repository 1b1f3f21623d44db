"""Summed negative log-likelihood per document, computed on packed rows (see `cptkit.eval.packing`).

The numbers are sums, not means, so that any grouping (per document, per set, per model) is exact:
loss = nats / predicted tokens, perplexity = exp(loss), bits per byte = nats / (ln 2 * UTF-8 bytes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cptkit.eval.packing import Batch, packed_batches


@dataclass
class Scores:
    """Per-document sums for one model on one set."""

    nats: list[float]
    tokens: list[int]

    @property
    def total_nats(self) -> float:
        return sum(self.nats)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)


def summarize(nats: float, tokens: int, num_bytes: int) -> dict[str, float]:
    """loss, perplexity and bits per byte from summed nats, predicted tokens and UTF-8 bytes."""
    loss = nats / tokens if tokens else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if tokens and loss < 700 else float("inf"),
        "bits_per_byte": nats / (math.log(2) * num_bytes) if num_bytes else float("nan"),
    }


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def batch_logits(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits of scored positions, their target ids, their document index), in float32.

    Position t predicts token t + 1; a target labelled -100 (a window's first token, padding) is dropped.
    """
    device = model_device(model)
    out = model(
        input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device), use_cache=False
    )
    targets = batch.labels[:, 1:].to(device)
    keep = targets != -100
    logits = out.logits[:, :-1][keep].float()
    return logits, targets[keep], batch.doc_index[:, 1:].to(device)[keep]


def iter_batches(
    model, batches: list[Batch], desc: str | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """batch_logits over every batch, with a progress bar when `desc` is given."""
    from tqdm.auto import tqdm

    for batch in tqdm(batches, desc=desc, unit="batch", disable=None if desc else True, leave=False):
        yield batch_logits(model, batch)


def iter_scored(
    model, docs: list[list[int]], seq_length: int, batch_size: int, pad_id: int, desc: str | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """batch_logits over every packed batch of `docs`, with a progress bar when `desc` is given."""
    yield from iter_batches(model, packed_batches(docs, seq_length, batch_size, pad_id), desc)


def score_batches(model, batches: list[Batch], num_docs: int, desc: str | None = None) -> Scores:
    """Summed nats and predicted tokens per document (`Batch.doc_index`) over packed batches."""
    nats = torch.zeros(num_docs, dtype=torch.float64)
    tokens = torch.zeros(num_docs, dtype=torch.long)
    for logits, targets, doc in iter_batches(model, batches, desc):
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        nats.index_add_(0, doc.cpu(), loss.double().cpu())
        tokens.index_add_(0, doc.cpu(), torch.ones_like(doc.cpu()))
    return Scores(nats.tolist(), tokens.tolist())


def score_documents(
    model,
    docs: list[list[int]],
    seq_length: int,
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str | None = None,
) -> Scores:
    """Summed nats and predicted tokens per document; identical to scoring each document on its own."""
    return score_batches(model, packed_batches(docs, seq_length, batch_size, pad_id), len(docs), desc)

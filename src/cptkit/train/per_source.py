"""The training loss of each source (the domain, each replay source) at every logging step.

A term of the training loss that adds nothing to it: on the micro-batches of logging steps only, it
scores the labelled tokens of each source (the batch's `source_ids`) and logs their mean next-token
loss as `loss/source/<name>`. The mean is weighted by tokens over the accumulated micro-batches and
the processes: each micro-batch reports a sum and a count per source, both are averaged the same way
until the log, and `finish` divides them. It costs nothing when the forward returned logits and one
chunked lm_head projection without gradients on the selected tokens under the fused cross-entropy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from cptkit.train.heads import chunks, last_hidden, next_token_positions, output_head, token_losses

log = logging.getLogger(__name__)

LOSS_KEY = "loss/source/{}"
TOKENS_KEY = "tokens/source/{}"


class LossPerSource:
    """Mean next-token loss of each source's labelled tokens, logged, never trained on (value 0).

    `source_names` maps a batch's `source_ids` to names. Batches without `source_ids` log nothing."""

    name = "loss_per_source"
    logging_steps_only = True  # LossTerms calls it on the micro-batches of logging steps only
    needs_hidden_states = True  # under the fused cross-entropy the forward returns no logits

    def __init__(self, source_names: Mapping[int, str], chunk_tokens: int = 1024):
        if not source_names:
            raise ValueError("LossPerSource needs the names of the sources")
        self.source_names = dict(sorted(source_names.items()))
        self.chunk_tokens = chunk_tokens

    def __call__(self, model: Any, inputs: Mapping[str, Any], outputs: Any):
        zero = torch.zeros((), device=inputs["labels"].device)
        if inputs.get("source_ids") is None:
            return zero, {}
        rows, cols = next_token_positions(inputs)
        targets = inputs["labels"][rows, cols + 1]
        losses = self._losses(model, outputs, rows, cols, targets)
        ids = inputs["source_ids"][rows, cols + 1]
        metrics: dict[str, torch.Tensor | float] = {}
        for index, name in self.source_names.items():
            mine = ids == index
            metrics[LOSS_KEY.format(name)] = losses[mine].sum()
            metrics[TOKENS_KEY.format(name)] = mine.sum().float()
        return zero, metrics

    @torch.no_grad()
    def _losses(self, model, outputs, rows, cols, targets) -> torch.Tensor:
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else outputs.logits
        if logits is None:
            hidden = last_hidden(outputs)[rows, cols]
            weight, bias = output_head(getattr(model, "module", model))
            return token_losses(hidden, weight, bias, targets, self.chunk_tokens)
        losses = torch.empty(len(targets), dtype=torch.float32, device=targets.device)
        for part in chunks(len(targets), self.chunk_tokens):
            chosen = logits[rows[part], cols[part]].float()
            losses[part] = F.cross_entropy(chosen, targets[part], reduction="none")
        return losses

    def finish(self, means: dict[str, float]) -> dict[str, float]:
        """Each source's summed loss divided by its token count (a source with no tokens since the
        last log is left out); the counts themselves are not logged."""
        for name in self.source_names.values():
            total, count = means.pop(LOSS_KEY.format(name), None), means.pop(TOKENS_KEY.format(name), None)
            if total is not None and count:
                means[LOSS_KEY.format(name)] = total / count
        return means

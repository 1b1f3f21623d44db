"""The diagonal empirical Fisher that EWC weighs drift with, estimated on general training rows.

F_i = mean over rows of (d loss_row / d theta_i)^2, where loss_row is the causal-LM loss of ONE packed
training row on its general (replay) tokens only (the labels of every other token are -100). Rows are
taken one at a time, not in batches: the Fisher is a mean of squared per-sample gradients, and the square
of a batch's mean gradient would cancel the directions rows disagree on and underestimate it. Each row
costs one forward and backward pass; `ewc.fisher_rows` of them are made once, before training. The
held-out sets are never used: they must stay clean for evaluation.

What is estimated (`EwcTargets`):
- full fine-tuning: every trainable parameter, from its own gradient;
- LoRA/QLoRA: the adapters start at B = 0, so the Fisher of A and B says nothing about the weights the
  update moves. The Fisher of each adapted BASE weight W (d_out x d_in) is taken instead: its gradient
  is g^T x, from the module's input x and the gradient g of its output, captured with hooks, so W need
  not require grad and may be a 4-bit bitsandbytes weight. peft's modules_to_save (embeddings trained in
  full) get their own gradients' Fisher. LoRA on an embedding layer is left out (warned).
The estimate runs in eval mode (no dropout) and leaves the model's training state and empty gradients.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cptkit.errors import CptkitError
from cptkit.train.collator import IGNORE_INDEX
from cptkit.train.l2 import LoraUpdate, frozen_copies, lora_updates, saved_module_pairs

log = logging.getLogger(__name__)


@dataclass
class EwcTargets:
    """The weights EWC watches: `direct` (name, trained parameter, its base value) whose Fisher comes
    from their own gradients, and `updates`, LoRA updates whose Fisher is that of their base weight."""

    direct: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)
    updates: list[LoraUpdate] = field(default_factory=list)

    @classmethod
    def of(cls, model: Any, mode: str) -> EwcTargets:
        if mode == "full":
            return cls(direct=frozen_copies(model))
        updates = lora_updates(model)
        if not updates:
            raise ValueError(f"mode {mode}: the model has no LoRA layers")
        for u in updates:
            if u.is_embedding:
                log.warning("ewc: %s is a LoRA embedding, which EWC leaves out", u.name)
        return cls(direct=list(saved_module_pairs(model)), updates=[u for u in updates if not u.is_embedding])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The Fisher's tensors by name, with their shapes (a LoRA update's: its base weight's, d_out x d_in)."""
        shapes = {name: tuple(param.shape) for name, param, _ in self.direct}
        for u in self.updates:
            A, B, _ = u.factors()
            shapes[base_weight_name(u)] = (B.shape[0], A.shape[1])
        return shapes


def base_weight_name(update: LoraUpdate) -> str:
    return f"{update.name}.base_layer.weight"


def general_rows(
    rows: Any,
    collator: Any,
    general: frozenset[int],
    limit: int,
) -> list[dict[str, torch.Tensor]]:
    """The first `limit` training rows that hold general tokens, each a batch of one with the labels of
    every other token set to -100 (in the rows' order, which prepare shuffled). Rows whose batches carry
    no `source_ids` cannot say which tokens are general: refused."""
    if not general:
        raise CptkitError(
            "train.regularize.ewc: the dataset has no general (replay) source to estimate the Fisher on; "
            "add a source with role: general to data.sources and prepare again"
        )
    ids = torch.tensor(sorted(general))
    found = []
    for index in range(len(rows)):
        batch = collator([rows[index]])
        if "source_ids" not in batch:
            raise CptkitError(
                "train.regularize.ewc: the training rows do not record their sources; prepare the dataset "
                "again with this version of cptkit"
            )
        labels = torch.where(torch.isin(batch["source_ids"], ids), batch["labels"], IGNORE_INDEX)
        if (labels[:, 1:] != IGNORE_INDEX).any():  # the first label is never predicted
            found.append(
                {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "labels": labels}
            )
            if len(found) == limit:
                break
    if not found:
        raise CptkitError(
            "train.regularize.ewc: no training row holds a general token to estimate the Fisher on"
        )
    return found


def rows_digest(batches: Sequence[Mapping[str, torch.Tensor]]) -> str:
    """sha256 of the rows' token ids and labels: what the Fisher was estimated on, exactly."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "labels"):
            digest.update(batch[key].to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def estimate_fisher(
    model: Any, targets: EwcTargets, batches: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher (float32, on each weight's device) of `targets`, a mean over the
    batches of one row each."""
    sums = {name: torch.zeros_like(param, dtype=torch.float32) for name, param, _ in targets.direct}
    calls: dict[str, int] = {}
    hooks, shapes = [], targets.shapes()
    for u in targets.updates:
        name, weight = base_weight_name(u), u.module.base_layer.weight
        sums[name] = torch.zeros(shapes[name], dtype=torch.float32, device=weight.device)
        hooks.append(u.module.register_forward_hook(_squared_weight_gradient(name, sums, calls)))
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            calls.clear()
            model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
            for name, param, _ in targets.direct:
                if param.grad is not None:
                    sums[name] += param.grad.float().square()
            twice = sorted(name for name, n in calls.items() if n != 1)
            if twice:  # the square of a row's gradient needs its whole gradient in one piece
                raise ValueError(f"ewc: modules called more than once per forward pass: {', '.join(twice)}")
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {name: total / len(batches) for name, total in sums.items()}


def _squared_weight_gradient(name: str, sums: dict[str, torch.Tensor], calls: dict[str, int]):
    """A forward hook on a LoRA layer that adds the square of its base weight's gradient, g^T x, to
    `sums[name]` when the backward pass reaches the layer's output (the base layer's output gradient:
    the layer returns base output + LoRA update)."""

    def hook(module: Any, args: tuple, output: torch.Tensor) -> None:
        if not output.requires_grad:
            raise ValueError(f"ewc: the output of {name} carries no gradient")
        calls[name] = calls.get(name, 0) + 1
        x = args[0].detach()

        def add(grad: torch.Tensor) -> None:
            g = grad.reshape(-1, grad.shape[-1]).float()
            sums[name] += (g.T @ x.reshape(-1, x.shape[-1]).float()).square()

        output.register_hook(add)

    return hook

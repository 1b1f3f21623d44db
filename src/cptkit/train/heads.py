"""The model's next-token predictions on a chosen set of tokens, without full-vocabulary logits for all.

Terms that look at next-token distributions (the loss per source, KL to the base model) pick the
positions they need first (`next_token_positions`), take the final hidden states there (`last_hidden`,
after the final norm) and project them through the output head (`output_head`) a chunk of tokens at
a time, so memory stays at one chunk times the vocabulary, as the fused cross-entropy keeps it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from cptkit.train.collator import IGNORE_INDEX


def next_token_positions(
    inputs: Mapping[str, Any], sources: Collection[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the positions whose next token carries a label, as transformers shifts
    them: the prediction at column t is scored on labels[t + 1]. With `sources`, only the positions
    whose next token came from one of those sources (the batch's `source_ids`; a ValueError without them).
    """
    labels = inputs["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    if sources is not None:
        source_ids = inputs.get("source_ids")
        if source_ids is None:
            raise ValueError("selecting tokens by source needs batches with source_ids")
        wanted = torch.as_tensor(sorted(sources), dtype=source_ids.dtype, device=source_ids.device)
        mask &= torch.isin(source_ids[:, 1:], wanted)
    return mask.nonzero(as_tuple=True)


def final_norm(model: Any) -> torch.nn.Module | None:
    """The decoder's final norm (whose output the lm_head projects), through DDP/accelerate and peft
    wrappers; None for a model that has none where decoders keep it (`get_decoder().norm`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DDP, DeepSpeed
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()  # peft
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    return norm if isinstance(norm, torch.nn.Module) else None


@contextmanager
def capturing_last_hidden(model: Any) -> Iterator[list[torch.Tensor] | None]:
    """Keep the final norm's output of the forward passes made inside (a list that gets it), or yield
    None where the model has no such norm (then ask the forward for `output_hidden_states`).

    `output_hidden_states=True` keeps every layer's hidden states alive until the loss is computed
    (on an 8B model at 8 x 2048 tokens, 8.5 GiB beyond the memory plan, measured); the terms need only
    the last one, which the lm_head's backward keeps anyway."""
    norm = final_norm(model)
    if norm is None:
        yield None
        return
    captured: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


def last_hidden(outputs: Any) -> torch.Tensor:
    """The final hidden states of the forward pass, after the final norm: what the lm_head projects.

    transformers 5 returns them as `hidden_states[-1]` when the forward is asked for
    `output_hidden_states=True` (its output capture puts `last_hidden_state` there), and liger's fused
    cross-entropy forward passes the body's hidden states through, so this holds with and without it."""
    hidden = outputs.get("hidden_states") if isinstance(outputs, Mapping) else outputs.hidden_states
    if not hidden:
        raise ValueError("the forward pass was not asked for output_hidden_states")
    return hidden[-1]


def output_head(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight and bias as the forward uses them now: under peft, the trained
    copy of a lm_head in `modules_to_save`, or the original inside `disable_adapter()`."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def chunks(count: int, size: int) -> Iterator[slice]:
    """Slices of `size` (the last one shorter) covering range(count)."""
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


@torch.no_grad()
def token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_tokens: int,
) -> torch.Tensor:
    """Cross-entropy of each of the N selected tokens (hidden (N, H), targets (N,)), float32, no gradient,
    computed `chunk_tokens` at a time."""
    losses = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for part in chunks(len(targets), chunk_tokens):
        logits = F.linear(hidden[part].to(weight.dtype), weight, bias).float()  # hidden may be wider
        losses[part] = F.cross_entropy(logits, targets[part], reduction="none")
    return losses

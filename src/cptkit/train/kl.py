"""`train.regularize.kl_to_base`: keep the model's next-token predictions near the base model's.

The term is T^2 * KL(p_base || p_model), averaged over the selected tokens, where both distributions
are softmaxes at temperature T (the T^2 keeps the gradient's size independent of T, as in
distillation). The selected tokens are the labelled tokens of the general (replay) sources, or every
labelled token (`tokens: all`).

The base model is, for LoRA and QLoRA, the same network with its adapters disabled: one more forward
of the body without gradients, no second copy of the weights. For full fine-tuning it is a frozen copy
made before training (before a resumed run loads its checkpoint, so it is the base), on the same
device in the same dtype; its size is logged.

Full-vocabulary logits are never formed for all tokens: the tokens are selected first, then
`chunked_kl` computes the value and its gradients (with respect to the hidden states and, when it
trains, the lm_head) one chunk of `chunk_tokens` at a time in the forward, as liger's fused linear
losses do, so memory stays at one chunk times the vocabulary.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from cptkit.config.forgetting import KlToBaseConfig
from cptkit.model.attention import VARLEN_KEYS
from cptkit.train.heads import chunks, last_hidden, next_token_positions, output_head

log = logging.getLogger(__name__)


class _ChunkedKl(torch.autograd.Function):
    """T^2 * mean over N tokens of KL(softmax(base_logits / T) || softmax(logits / T)), where
    logits = hidden @ weight.T + bias, with its gradients computed chunk by chunk in the forward.

    d/dz of T^2 * KL(p || softmax(z / T)) is T * (q - p): no logits are kept for the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, base_hidden, base_weight, base_bias, temperature, chunk_tokens):
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes below are chosen, not cast
            grads = _kl_and_grads(
                hidden, weight, bias, base_hidden, base_weight, base_bias, temperature, chunk_tokens
            )
        total, grad_hidden, grad_weight, grad_bias = grads
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_output).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_output).to(bias_dtype),
            *([None] * 5),
        )


def _kl_and_grads(hidden, weight, bias, base_hidden, base_weight, base_bias, temperature, chunk_tokens):
    """The term's value and its gradients (None where an input needs none), one chunk at a time."""
    count = hidden.shape[0]
    scale = temperature / max(count, 1)
    wide = torch.promote_types(weight.dtype, torch.float32)  # logits and sums in float32 at least
    grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
    grad_weight = torch.zeros_like(weight, dtype=wide) if weight.requires_grad else None
    wants_bias = bias is not None and bias.requires_grad
    grad_bias = torch.zeros_like(bias, dtype=wide) if wants_bias else None
    total = torch.zeros((), dtype=wide, device=hidden.device)
    for part in chunks(count, chunk_tokens):
        h = hidden[part].to(weight.dtype)
        log_q = F.log_softmax(F.linear(h, weight, bias).to(wide) / temperature, dim=-1)
        base = F.linear(base_hidden[part].to(base_weight.dtype), base_weight, base_bias).to(wide)
        log_p = F.log_softmax(base / temperature, dim=-1)
        p = log_p.exp()
        total += (p * (log_p - log_q)).sum()
        grad_logits = (log_q.exp() - p) * scale
        if grad_hidden is not None:
            grad_hidden[part] = grad_logits.to(weight.dtype) @ weight
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.T, h.to(wide))
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
    return total * (temperature * temperature / max(count, 1)), grad_hidden, grad_weight, grad_bias


def chunked_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    base_hidden: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """T^2 * the mean KL(base || model) over N tokens, from their final hidden states (N, H) and the
    output heads (V, H): at most `chunk_tokens` x V logits exist at once. Zero tokens give 0."""
    if chunk_tokens < 1 or temperature <= 0:
        raise ValueError("chunk_tokens must be at least 1 and temperature positive")
    return _ChunkedKl.apply(
        hidden, weight, bias, base_hidden.detach(), base_weight.detach(),
        None if base_bias is None else base_bias.detach(), float(temperature), int(chunk_tokens),
    )  # fmt: skip


def _is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


class KlToBase:
    """The `kl_to_base` loss term: weight * T^2 * KL(base || model) on the selected tokens.

    `model` is the model being trained (unwrapped); `reference` the frozen base for full fine-tuning
    (None under peft, where the base is the model with its adapters disabled). `sources`: the ids of the
    sources whose tokens count, None for every labelled token. Logged as `loss/kl_to_base` (its share of
    the loss) and `regularize/kl_to_base` (the divergence itself, unweighted)."""

    name = "kl_to_base"
    needs_hidden_states = True

    def __init__(
        self,
        cfg: KlToBaseConfig,
        model: Any,
        sources: Collection[int] | None,
        reference: Any = None,
    ):
        if reference is None and not _is_peft(model):
            raise ValueError("kl_to_base needs a frozen reference copy of a model without adapters")
        self.cfg = cfg
        self.model = model
        self.sources = None if sources is None else frozenset(sources)
        self.reference = reference

    @classmethod
    def build(cls, cfg: KlToBaseConfig, model: Any, general_sources: Collection[int]) -> KlToBase:
        """The term for `model`: under peft its own base, else a frozen copy of it made now."""
        sources = None if cfg.tokens == "all" else general_sources
        return cls(cfg, model, sources, None if _is_peft(model) else frozen_reference(model))

    def __call__(self, model: Any, inputs: Mapping[str, Any], outputs: Any):
        rows, cols = next_token_positions(inputs, self.sources)
        hidden = last_hidden(outputs)[rows, cols]
        weight, bias = output_head(self.model)  # the trained head (peft's modules_to_save copy if any)
        base_hidden, base_weight, base_bias = self._base_side(inputs, rows, cols)
        kl = chunked_kl(
            hidden,
            weight,
            bias,
            base_hidden,
            base_weight,
            base_bias,
            self.cfg.temperature,
            self.cfg.chunk_tokens,
        )
        share = self.cfg.weight * kl
        return share, {"loss/kl_to_base": share.detach(), "regularize/kl_to_base": kl.detach()}

    @torch.no_grad()
    def _base_side(self, inputs: Mapping[str, Any], rows: torch.Tensor, cols: torch.Tensor):
        """The base's final hidden states at the selected positions and its output head."""
        base = self.reference if self.reference is not None else self.model
        disabled = self.model.disable_adapter() if self.reference is None else nullcontext()
        with disabled:
            weight, bias = output_head(base)
            if len(rows) == 0:  # nothing selected: no forward needed
                return weight.new_zeros((0, weight.shape[1])), weight, bias
            body = _body(base)
            keys = ("input_ids", "position_ids", "attention_mask", *VARLEN_KEYS)
            forward = {k: inputs[k] for k in keys if k in inputs}
            hidden = body(**forward).last_hidden_state
        return hidden[rows, cols], weight, bias


def _body(model: Any) -> Any:
    """The transformer body (everything before the lm_head) of a causal LM, under peft or not."""
    lm = model.get_base_model() if _is_peft(model) else model
    return lm.get_decoder()


def frozen_reference(model: Any) -> Any:
    """A frozen copy of `model` (eval mode, no gradients, same device and dtype), its size logged."""
    from cptkit.model.load import local_device

    reference = copy.deepcopy(model)
    if torch.cuda.is_available() and next(reference.parameters()).device.type == "cpu":
        reference.to(local_device())  # DeepSpeed places the trained model itself, later
    reference.eval()
    reference.requires_grad_(False)
    size = sum(p.numel() * p.element_size() for p in reference.parameters())
    log.info("KL reference: %.2f GiB (a frozen copy of the base model for kl_to_base)", size / 2**30)
    return reference

"""The training loss as a sum of terms: the causal-LM loss first, then any regularizer the config asks for.

`CptTrainer.compute_loss` makes one forward pass with labels (so liger's fused linear cross-entropy
never materialises the logits) and hands its outputs to every term. Each term returns its value and
the metrics to log; `LossTerms` adds the values and keeps the metrics until the next training log,
where they land in the logs and metrics.jsonl under whatever keys the term chose (e.g. `loss/causal_lm`).

A new term (KL to the base model, L2 to the base weights, EWC, ...) is one class with the `LossTerm`
shape and a config field that `build_loss_terms` reads; the trainer does not change. A term may also
say, as class attributes, that it needs the final hidden states (`needs_hidden_states`: the forward is
then asked for them) or that it only measures and runs on the micro-batches of logging steps
(`logging_steps_only`), and may turn the averaged metrics into their logged form (`finish`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from cptkit.config.train import TrainingRun
from cptkit.data.prepared import NO_SOURCE_IDS

log = logging.getLogger(__name__)


class LossTerm(Protocol):
    """One part of the training loss.

    Called with the model, the batch and the outputs of the trainer's forward pass. Returns the term's
    value (a scalar tensor that carries gradients) and metrics to log (tensors or floats; tensors are
    read only when the step is logged, so logging costs no device sync per batch). Every term after the
    first returns a mean over its batch: the trainer scales it for gradient accumulation.

    Optional class attributes: `needs_hidden_states = True` (the forward returns `hidden_states`, the
    last one after the final norm: `cptkit.train.heads.last_hidden`), `logging_steps_only = True` (called
    only on the micro-batches of steps that log). An optional `finish(means) -> means` turns the metrics,
    averaged over steps and processes, into what is logged (e.g. sums and counts into a token mean).
    """

    name: str

    def __call__(
        self, model: Any, inputs: Mapping[str, Any], outputs: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]: ...


class CausalLMLoss:
    """Next-token cross-entropy on the labelled tokens: the model's own loss from the forward pass
    (`outputs.loss`, as transformers.Trainer scaled it for gradient accumulation and devices)."""

    name = "causal_lm"

    def __call__(self, model: Any, inputs: Mapping[str, Any], outputs: Any):
        loss = outputs["loss"]
        return loss, {"loss/causal_lm": loss.detach()}


@dataclass
class LossContext:
    """What the terms after the first need besides the batch, built once before training.

    `source_names` maps the values of a batch's `source_ids` (one per token, -1 on padding; the
    prepared manifest's `source_index`) to source names; `general_sources` are the ids of the general
    (replay) sources. `train_rows` and `collator` give the training data (EWC estimates its Fisher on
    the general rows); `resume_from` is the checkpoint the run continues from, if any.
    """

    model: Any
    output_dir: Path
    source_names: dict[int, str] = field(default_factory=dict)
    general_sources: frozenset[int] = frozenset()
    train_rows: Any = None
    collator: Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]] | None = None
    resume_from: str | None = None


def build_loss_terms(train_cfg: TrainingRun, context: LossContext | None = None) -> list[LossTerm]:
    """The loss terms `train_cfg` asks for, the causal-LM loss first. Terms that need the model or the
    sources come only with a `context`; `cptkit sft`'s config has no regularizers."""
    terms: list[LossTerm] = [CausalLMLoss()]
    regularize = getattr(train_cfg, "regularize", None)
    asked = [
        n for n in ("kl_to_base", "l2_to_base", "ewc") if regularize and getattr(regularize, n).weight > 0
    ]
    if context is None:
        if asked:  # never a regularizer silently dropped
            raise ValueError(f"train.regularize.{asked[0]} needs a LossContext (build_trainer makes one)")
        return terms
    if getattr(train_cfg, "loss_per_source", False):
        if context.source_names:
            from cptkit.train.per_source import LossPerSource

            terms.append(LossPerSource(context.source_names))
        else:
            log.info("no per-source training loss: %s", NO_SOURCE_IDS)
    if "kl_to_base" in asked:
        from cptkit.train.kl import KlToBase

        terms.append(KlToBase.build(regularize.kl_to_base, context.model, context.general_sources))
    if "l2_to_base" in asked:
        from cptkit.train.l2 import L2ToBase

        terms.append(L2ToBase.build(train_cfg, context))
    if "ewc" in asked:
        from cptkit.train.ewc import Ewc

        terms.append(Ewc.build(train_cfg, context))
    return terms


class LossTerms:
    """Sums the terms and keeps their metrics until the next training log.

    Metrics are weighted the way their term enters the logged `loss` (a term's value is its share of
    the loss, the parts add up to it) and averaged over the optimizer steps since the last log. They
    are averaged over the processes when the step is logged.
    """

    def __init__(self, terms: Sequence[LossTerm]):
        if not terms or not isinstance(terms[0], CausalLMLoss):
            raise ValueError("the loss terms start with CausalLMLoss")
        self.terms = list(terms)
        self._sums: dict[str, torch.Tensor | float] = {}
        self._steps = 0.0  # optimizer steps since the last log: each micro-batch is 1/accumulation_steps

    def __call__(
        self,
        model: Any,
        inputs: Mapping[str, Any],
        outputs: Any,
        accumulation_steps: int = 1,
        causal_lm_is_scaled: bool = False,
        logging_step: bool = True,
    ) -> torch.Tensor:
        """The summed loss of one micro-batch (`logging_step`: its step logs, so measuring terms run).

        `causal_lm_is_scaled`: the first term is already normalised over the `accumulation_steps`
        micro-batches of the optimizer step (transformers passes `num_items_in_batch` to the model), so
        the Trainer will not divide the sum by them: the other terms, batch means, are divided here.
        """
        steps = max(accumulation_steps, 1)
        later = 1 / steps if causal_lm_is_scaled else 1.0  # the Trainer divides the whole sum otherwise
        total, metrics = self.terms[0](model, inputs, outputs)
        shares = {key: 1.0 if causal_lm_is_scaled else 1 / steps for key in metrics}
        for term in self.terms[1:]:
            if getattr(term, "logging_steps_only", False) and not logging_step:
                continue
            value, more = term(model, inputs, outputs)
            total = total + later * value
            metrics = {**metrics, **more}
            shares.update({key: 1 / steps for key in more})
        if model.training:
            self._steps += 1 / steps
            for key, value in metrics.items():
                value = value.detach() if isinstance(value, torch.Tensor) else value
                self._sums[key] = self._sums.get(key, 0.0) + value * shares[key]
        return total

    def needs_hidden_states(self, logging_step: bool = True) -> bool:
        """Whether a term that runs on this micro-batch reads the final hidden states."""
        return any(
            getattr(term, "needs_hidden_states", False)
            and (logging_step or not getattr(term, "logging_steps_only", False))
            for term in self.terms
        )

    def pop_means(self) -> dict[str, float]:
        """Each metric averaged over the optimizer steps since the last call, and over the processes of
        a distributed run (every rank logs at the same steps with the same terms), then each term's
        `finish`; the sums start again."""
        means = {key: float(value) / self._steps for key, value in self._sums.items()} if self._steps else {}
        self._sums, self._steps = {}, 0.0
        means = _mean_over_processes(means)
        for term in self.terms:
            finish = getattr(term, "finish", None)
            if finish is not None:
                means = finish(means)
        return means


def _mean_over_processes(means: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    if not means or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return means
    keys = sorted(means)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    values = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, values.tolist(), strict=True)}

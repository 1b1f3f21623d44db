"""Settings that control forgetting during `cptkit train`: regularizers against the base model and the
forgetting budget (the most general held-out perplexity may rise over the base)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cptkit.config.fields import at_least, opt


@dataclass
class KlToBaseConfig:
    """KL(base || model) on next-token distributions: keeps the model's predictions near the base's."""

    weight: float = opt(0.0, "weight of the term in the loss; 0: off")
    tokens: Literal["replay", "all"] = opt(
        "replay", "replay: only tokens of general (replay) sources; all: every labelled token"
    )
    temperature: float = opt(
        1.0,
        "softmax temperature of both distributions (the term is scaled by its square, as in distillation)",
    )
    chunk_tokens: int = opt(
        1024, "tokens whose vocabulary logits are computed at once (memory stays at one chunk)"
    )

    def check(self, path: str):
        problems = []
        if self.weight < 0:
            problems.append((f"{path}.weight", f"{self.weight} must be 0 (off) or more"))
        if not self.temperature > 0:
            problems.append(
                (f"{path}.temperature", f"{self.temperature} must be positive (1: the plain softmax)")
            )
        if self.chunk_tokens < 1:
            problems.append((f"{path}.chunk_tokens", f"{self.chunk_tokens} must be at least 1"))
        return problems


@dataclass
class L2ToBaseConfig:
    """The squared distance of the trained weights from the base's (LoRA: of each update B @ A * scale)."""

    weight: float = opt(
        0.0,
        "weight of the term in the loss (weight * the summed squared drift of every trained weight); 0: off",
    )

    def check(self, path: str):
        return _non_negative_weight(self.weight, path)


@dataclass
class EwcConfig:
    """Elastic weight consolidation: a diagonal Fisher from general training rows, estimated before
    training and saved beside the run, weighs each weight's drift from the base."""

    weight: float = opt(
        0.0,
        "weight of the term in the loss (weight / 2 * sum F * drift^2, F normalised to mean 1: weight w "
        "weighs an average weight's drift as l2_to_base does at w / 2); 0: off",
    )
    fisher_rows: int = opt(64, "general training rows the Fisher is estimated on (one backward pass each)")

    def check(self, path: str):
        return _non_negative_weight(self.weight, path) + at_least(self, path, fisher_rows=1)


@dataclass
class RegularizeConfig:
    """Regularizers against the base model, each opt-in with a weight and logged on its own."""

    kl_to_base: KlToBaseConfig = opt(factory=KlToBaseConfig, help="KL to the base model's predictions")
    l2_to_base: L2ToBaseConfig = opt(factory=L2ToBaseConfig, help="L2 distance to the base weights")
    ewc: EwcConfig = opt(factory=EwcConfig, help="elastic weight consolidation")


def _non_negative_weight(weight: float, path: str) -> list[tuple[str, str]]:
    if weight < 0:
        return [(f"{path}.weight", f"{weight} is negative; use 0 to turn the term off")]
    return []


def forgetting_problems(train, data) -> list[tuple[str, str]]:
    """What the forgetting controls of `train` need from the sources of `data` (the dataset it trains on),
    found when the config loads, before prepare spends its time: a general held-out set for the budget,
    general training rows for kl_to_base on replay tokens and for EWC's Fisher."""
    general = [s for s in data.sources if s.role == "general"]
    training = [s for s in general if s.weight > 0]
    held_out = [s for s in general if _heldout_fraction(s, data) > 0]
    add = "add a source with role: general (type: self_replay when you have no general text)"
    problems = []
    if train.forgetting_budget is not None and not held_out:
        problems.append(
            (
                "train.forgetting_budget",
                f"needs a general held-out set to check, and data.sources holds none: {add}, or remove "
                "train.forgetting_budget",
            )
        )
    kl = train.regularize.kl_to_base
    if kl.weight > 0 and kl.tokens == "replay" and not training:
        problems.append(
            (
                "train.regularize.kl_to_base.tokens",
                f"replay: no general source trains (role: general, weight > 0), so no token is selected: {add} "
                "and a weight, or set tokens: all",
            )
        )
    if train.regularize.ewc.weight > 0 and not training:
        problems.append(
            (
                "train.regularize.ewc.weight",
                f"EWC's Fisher comes from general training rows and no general source trains: {add} with "
                "weight > 0, or set the weight to 0",
            )
        )
    return problems


def _heldout_fraction(source, data) -> float:
    if source.heldout_fraction is not None:
        return source.heldout_fraction
    return 1.0 if source.weight == 0 else data.heldout_fraction

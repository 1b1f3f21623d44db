"""`eval.interpolate`: the adapted model scored at points between the base (scale 0) and itself (1),
without writing a model, and the point that gains most on the domain within the forgetting budget.

A point at scale s is what `cptkit merge` with `merge.scale: s` writes. LoRA/QLoRA: the adapter loaded
once on its base, each layer's scaling multiplied by s (and each trained module copy moved s of the way
from the base's), restored after. Full fine-tuning: the trained model loaded once, its weights set to
base + s * (trained - base) from the two checkpoints on disk, one tensor at a time (one model in memory).
Each point's rows are named `interpolated@<s>` in results.json's `results` and `deltas`, like any model.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cptkit.config.evaluate import EvalModel
from cptkit.errors import CptkitError
from cptkit.eval.score import load_scored_model, score_model
from cptkit.eval.sets import EvalSet
from cptkit.merge.checkpoint import Checkpoint, read_checkpoint, resolve_model_folder
from cptkit.merge.full import check_same_model, interpolated_tensors
from cptkit.merge.scale import interpolated

log = logging.getLogger(__name__)

ADAPTED, BASE = "adapted", "base"  # the eval.models names the sweep runs between
NO_BUDGET = "no train.forgetting_budget: 0, general perplexity not above the base's (point estimate)"


def point_name(scale: float) -> str:
    """The model name of one point in results.json: interpolated@0.5."""
    return f"interpolated@{scale:g}"


@dataclass
class Sweep:
    """What eval.interpolate scores: the adapted model at each scale, against the base."""

    scales: list[float]
    adapted: EvalModel
    base: EvalModel
    budget: float
    budget_from: str
    checkpoints: tuple[Checkpoint, Checkpoint] | None = None  # full fine-tuning: (base, trained)

    @property
    def mode(self) -> str:
        return "lora" if self.adapted.adapter is not None else "full"


def plan_sweep(scales: list[float], models: list[EvalModel], forgetting_budget: float | None) -> Sweep | None:
    """The sweep to run (None when eval.interpolate is empty), refused before any model loads when there
    is no adapted model, no base, or (full fine-tuning) a trained model that is not the base fine-tuned."""
    if not scales:
        return None
    by_name = {m.name: m for m in models}
    for name, what in ((ADAPTED, "the trained adapter or full model"), (BASE, "the base model")):
        if name not in by_name:
            raise CptkitError(
                f"eval.interpolate: no model named {name!r} ({what}) among the evaluated models "
                f"({', '.join(by_name) or 'none'}); train first, or name it {name!r} in eval.models, "
                "or remove eval.interpolate"
            )
    adapted, base = by_name[ADAPTED], by_name[BASE]
    checkpoints = None
    if adapted.adapter is None:
        checkpoints = (read_checkpoint(resolve_model_folder(base.path)), read_checkpoint(adapted.path))
        check_same_model(*checkpoints)
    if forgetting_budget is None:
        budget, budget_from = 0.0, NO_BUDGET
    else:
        budget, budget_from = forgetting_budget, "train.forgetting_budget"
    return Sweep(sorted(scales), adapted, base, budget, budget_from, checkpoints)


def run_sweep(
    sweep: Sweep,
    sets: list[EvalSet],
    seq_length: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> list[dict[str, Any]]:
    """The result rows of every point, on every set; the adapted model is loaded once for all of them."""
    notes: list[str] = []  # what loading says was done differently is already noted for `adapted`
    model = load_scored_model(sweep.adapted, device, dtype, notes, trust_remote_code)
    rows: list[dict[str, Any]] = []
    for scale in sweep.scales:
        log.info("eval.interpolate: scoring the adapted model at scale %g", scale)
        with _at_scale(model, sweep, scale):
            spec = EvalModel(name=point_name(scale), path=sweep.adapted.path, adapter=sweep.adapted.adapter)
            rows += score_model(
                spec,
                sets,
                seq_length,
                batch_size,
                device,
                dtype,
                notes,
                trust_remote_code=trust_remote_code,
                model=model,
            )
    del model
    gc.collect()
    return rows


def _at_scale(model, sweep: Sweep, scale: float) -> contextlib.AbstractContextManager:
    if sweep.checkpoints is not None:
        set_interpolated_weights(model, *sweep.checkpoints, scale)
        return contextlib.nullcontext()
    return adapter_at_scale(model, scale)


@contextlib.contextmanager
def adapter_at_scale(model, scale: float) -> Iterator[None]:
    """A peft LoRA model as `merge.scale: scale` merges it: every LoRA layer's scaling times `scale`, every
    trained module copy (modules_to_save) at base + scale * (trained - base); all restored on exit."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    scalings: list[tuple[dict[str, float], dict[str, float]]] = []
    weights: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    scalings.append((module.scaling, dict(module.scaling)))
                    for name in module.scaling:
                        module.scaling[name] *= scale
                elif isinstance(module, ModulesToSaveWrapper) and scale != 1:
                    base = dict(module.original_module.named_parameters())
                    for copy in module.modules_to_save.values():
                        for name, p in copy.named_parameters():
                            weights.append((p, p.detach().clone()))
                            p.copy_(interpolated(base[name], p, scale).to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for scaling, saved in scalings:
                scaling.update(saved)
            for p, saved in weights:
                p.copy_(saved)


@torch.no_grad()
def set_interpolated_weights(model, base: Checkpoint, trained: Checkpoint, scale: float) -> None:
    """Every weight of `model` (the trained full model, loaded) set to base + scale * (trained - base)."""
    state = model.state_dict()
    for key, value in interpolated_tensors(base, trained, scale):
        if key not in state:
            raise CptkitError(
                f"{trained.folder}: weight {key} is not a weight of the loaded model; "
                "this model cannot be interpolated in memory (merge it with merge.scale instead)"
            )
        state[key].copy_(value.to(state[key].dtype))


def role_change(rows: list[dict[str, Any]], base: str, model: str, role: str) -> float | None:
    """The change of perplexity (a fraction: 0.01 is 1% higher) of `model` against `base` over every set
    of `role` together (token-weighted loss), on the sets both were scored on; None without such sets."""
    before = {r["set"]: r for r in rows if r["model"] == base and r["role"] == role}
    after = {r["set"]: r for r in rows if r["model"] == model and r["set"] in before}
    if not after or not sum(r["tokens"] for r in after.values()):
        return None

    def loss(found: list[dict[str, Any]]) -> float:
        return sum(r["loss"] * r["tokens"] for r in found) / sum(r["tokens"] for r in found)

    return math.expm1(loss(list(after.values())) - loss([before[s] for s in after]))


def sweep_summary(sweep: Sweep, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json's `interpolation` block: per point the domain and general perplexity changes against
    the base, whether the general change is within the budget, and the best point: the largest domain
    gain among those within it."""
    points = []
    for scale in sweep.scales:
        domain = role_change(rows, sweep.base.name, point_name(scale), "domain")
        general = role_change(rows, sweep.base.name, point_name(scale), "general")
        points.append(
            {
                "scale": scale,
                "model": point_name(scale),
                "domain_change": domain,
                "general_change": general,
                "within_budget": None if general is None else general <= sweep.budget,
            }
        )
    best, why = _best(points, sweep.budget)
    return {
        "model": sweep.adapted.name,
        "mode": sweep.mode,
        "budget": sweep.budget,
        "budget_from": sweep.budget_from,
        "measure": "perplexity change against the base over every set of the role together, as a fraction",
        "points": points,
        "best": best,
        "why": why,
    }


def _best(points: list[dict[str, Any]], budget: float) -> tuple[dict[str, Any] | None, str]:
    if all(p["general_change"] is None for p in points):
        return None, "no general set: the forgetting budget cannot be checked"
    if all(p["domain_change"] is None for p in points):
        return None, "no domain set: there is no gain to choose by"
    within = [p for p in points if p["within_budget"]]
    if not within:
        least = min(points, key=lambda p: p["general_change"])
        return None, (
            f"no point within the budget ({budget:+.2%}); the least general change is "
            f"{least['general_change']:+.2%} at scale {least['scale']:g}"
        )
    best = min(within, key=lambda p: p["domain_change"])
    return best, f"the largest domain gain with general perplexity within {budget:+.2%} of the base"


def describe_best(block: dict[str, Any]) -> str:
    """One line on the best point, for the console and the report."""
    best = block.get("best")
    if best is None:
        return f"interpolation: no best point ({block['why']})"
    return (
        f"interpolation: best scale {best['scale']:g} (domain perplexity {best['domain_change']:+.2%}, "
        f"general {best['general_change']:+.2%}; budget {block['budget']:+.2%} from {block['budget_from']})"
    )


def print_sweep(block: dict[str, Any]) -> None:
    """The sweep's points and its best one on the terminal (stderr, as cptkit eval's summary)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cptkit eval: interpolation between base (0) and adapted (1)")
    for header in ("scale", "domain ppl change", "general ppl change", "within budget"):
        table.add_column(header, justify="right")
    for p in block["points"]:
        table.add_row(
            f"{p['scale']:g}",
            _percent(p["domain_change"]),
            _percent(p["general_change"]),
            {True: "yes", False: "no", None: "-"}[p["within_budget"]],
        )
    console = Console(stderr=True)
    console.print(table)
    console.print(describe_best(block))


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2%}"

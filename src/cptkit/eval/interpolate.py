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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cptkit.config.evaluate import EvalModel
from cptkit.errors import CptkitError
from cptkit.eval.score import load_scored_model, score_model
from cptkit.eval.sets import EvalSet
from cptkit.eval.tradeoff import NO_BUDGET, point_name
from cptkit.merge.checkpoint import Checkpoint, read_checkpoint, resolve_model_folder
from cptkit.merge.full import check_same_model, interpolated_tensors
from cptkit.merge.scale import adapter_at_scale

log = logging.getLogger(__name__)

ADAPTED, BASE = "adapted", "base"  # the eval.models names the sweep runs between


@dataclass
class Sweep:
    """What eval.interpolate scores: the adapted model at each scale, against the base."""

    scales: list[float]
    adapted: EvalModel
    base: EvalModel
    budget: float
    budget_from: str
    checkpoints: tuple[Checkpoint, Checkpoint] | None = None  # full fine-tuning: (base, trained)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    trust_remote_code: bool = False  # model.trust_remote_code

    @property
    def mode(self) -> str:
        return "lora" if self.adapted.adapter is not None else "full"


def plan_sweep(
    scales: list[float], models: list[EvalModel], forgetting_budget: float | None, **placement: Any
) -> Sweep | None:
    """The sweep to run (None when eval.interpolate is empty), refused before any model loads when there
    is no adapted model, no base, or (full fine-tuning) a trained model that is not the base fine-tuned.
    `placement`: the device, dtype and trust_remote_code the models load with (Sweep's fields)."""
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
    return Sweep(sorted(scales), adapted, base, budget, budget_from, checkpoints, **placement)


def run_sweep(
    sweep: Sweep, sets: list[EvalSet], seq_length: int, batch_size: int, tasks: Sequence[Any] = ()
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The result rows of every point, on every set, and each point's downstream `tasks` scores
    ({point name: {task: {metric: ...}}}, as `cptkit.eval.tasks.run_tasks` gives them); the adapted
    model is loaded once for all of them."""
    from cptkit.eval.models import load_tokenizer
    from cptkit.eval.tasks import run_tasks

    device, dtype, trust = sweep.device, sweep.dtype, sweep.trust_remote_code
    notes: list[str] = []  # what loading says was done differently is already noted for `adapted`
    model = load_scored_model(sweep.adapted, device, dtype, notes, trust)
    adapted = sweep.adapted
    tokenizer = load_tokenizer(adapted.adapter or adapted.path, adapted.path, trust) if tasks else None
    rows: list[dict[str, Any]] = []
    task_scores: dict[str, Any] = {}
    for scale in sweep.scales:
        log.info("eval.interpolate: scoring the adapted model at scale %g", scale)
        name = point_name(scale)
        with _at_scale(model, sweep, scale):
            spec = EvalModel(name=name, path=adapted.path, adapter=adapted.adapter)
            rows += score_model(
                spec, sets, seq_length, batch_size, device, dtype, notes, trust_remote_code=trust, model=model
            )
            if tasks:
                task_scores[name] = run_tasks(model, tokenizer, tasks, device, batch_size)
    del model
    gc.collect()
    return rows, task_scores


def _at_scale(model, sweep: Sweep, scale: float) -> contextlib.AbstractContextManager:
    if sweep.checkpoints is not None:
        set_interpolated_weights(model, *sweep.checkpoints, scale)
        return contextlib.nullcontext()
    return adapter_at_scale(model, scale)


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

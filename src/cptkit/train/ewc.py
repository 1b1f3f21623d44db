"""`ewc`: elastic weight consolidation against the base model, as a loss term.

The penalty is `weight / 2 * sum_i F_i (theta_i - theta_base_i)^2`, with F the diagonal Fisher of the
base model on general training rows (`cptkit.train.fisher`), estimated once before training and saved
in the run folder as `regularize/ewc_fisher.safetensors` (`paths.EWC_FISHER`, with what it was estimated
on; not at the root, where a full model's weight files are). A rerun or a resumed run of
the same settings loads it; a file made with other settings is estimated again (logged).

F is normalised to mean 1 over all the weights it covers. The raw Fisher's scale follows the gradients',
which shrink as models grow and differ between datasets; normalised, a weight w means the same at every
model size: an average weight's squared drift counts w / 2, as it would under `l2_to_base` at w / 2, and
the Fisher only redistributes that among the weights (more on those the general data relies on).

Full fine-tuning: the drift of each trainable parameter from a frozen copy taken when the term is built
(the base: a checkpoint to resume from is loaded later). LoRA/QLoRA: the drift of each adapted base weight
is the update `scale * B @ A`, formed one module at a time (one d_out x d_in float32 temporary per
module, in the forward and again in the backward pass, never all at once); F of the adapted weights
takes 4 bytes per element of them (logged). As with `l2_to_base`, the penalty does not depend on the
batch: gradient accumulation adds it up to one penalty per optimizer step.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cptkit.errors import CptkitError
from cptkit.locks import is_main_process
from cptkit.paths import EWC_FISHER
from cptkit.train.fisher import EwcTargets, base_weight_name, estimate_fisher, general_rows, rows_digest
from cptkit.train.l2 import SquaredDistance, memory_bytes, total

if TYPE_CHECKING:
    from cptkit.config.train import TrainConfig
    from cptkit.data.prepared import Prepared
    from cptkit.train.losses import LossContext

log = logging.getLogger(__name__)

METADATA_KEY = "cptkit_ewc"  # safetensors metadata: what the Fisher was estimated on (JSON)


class WeightedUpdateNorm(torch.autograd.Function):
    """sum(F * (scale * B @ A)^2) for one LoRA module; the backward pass forms B @ A again rather than
    keeping it, so only one module's d_out x d_in temporary exists at a time."""

    @staticmethod
    def forward(ctx, A, B, fisher, scale):
        ctx.save_for_backward(A, B, fisher)
        ctx.scale = scale
        return (fisher * (scale * (B.float() @ A.float())).square()).sum()

    @staticmethod
    def backward(ctx, grad_output):
        A, B, fisher = ctx.saved_tensors
        A32, B32 = A.float(), B.float()
        # d/dM of sum(F * (s M)^2) at M = B @ A is 2 s^2 F * M; then dA = B^T G, dB = G A^T
        grad = (2 * ctx.scale**2 * grad_output) * fisher * (B32 @ A32)
        return (B32.T @ grad).to(A.dtype), (grad @ A32.T).to(B.dtype), None, None


class Ewc:
    """The EWC loss term; logged as `loss/ewc` (the weighted penalty). `estimated` says whether this
    build estimated the Fisher (False: loaded from the run folder), `fisher_seconds` how long that took."""

    name = "ewc"

    def __init__(self, weight: float, targets: EwcTargets, fisher: dict[str, torch.Tensor]):
        if weight <= 0:
            raise ValueError("Ewc needs a positive weight (0 means: do not build the term)")
        self.weight, self.targets = weight, targets
        count = sum(f.numel() for f in fisher.values())
        mean = float(sum(f.double().sum() for f in fisher.values())) / max(count, 1)
        if not mean > 0:
            raise CptkitError(
                "train.regularize.ewc: the Fisher is zero on the general rows (no gradient reached the "
                "trained weights); check the general source's rows, or set train.regularize.ewc.weight: 0"
            )
        devices = {name: param.device for name, param, _ in targets.direct}
        devices.update({base_weight_name(u): u.factors()[0].device for u in targets.updates})
        self.fisher = {name: (f / mean).to(devices[name]) for name, f in fisher.items()}
        self.estimated, self.fisher_seconds = False, 0.0
        fisher_gb = memory_bytes(list(self.fisher.values())) / 1e9
        if targets.updates:
            log.info("ewc: the Fisher of the adapted weights takes %.2f GB", fisher_gb)
        else:  # full mode: the drift is measured from a copy of the base weights
            copy_gb = memory_bytes([ref for _, _, ref in targets.direct]) / 1e9
            log.info(
                "ewc: the Fisher takes %.2f GB, the frozen copy of the base weights %.2f GB",
                fisher_gb,
                copy_gb,
            )

    @classmethod
    def build(cls, train_cfg: TrainConfig, context: LossContext | None) -> Ewc:
        """The term `train.regularize.ewc` asks for: the Fisher loaded from the run folder when it was
        estimated there with the same settings, else estimated now on the context's base model."""
        if context is None or context.collator is None or context.train_rows is None:
            raise ValueError("ewc needs the LossContext with the model, the training rows and their collator")
        cfg, model = train_cfg.regularize.ewc, context.model
        targets = EwcTargets.of(model, train_cfg.mode)
        batches = general_rows(context.train_rows, context.collator, context.general_sources, cfg.fisher_rows)
        settings = {
            "format": 1,
            "mode": train_cfg.mode,
            "base_model": getattr(getattr(model, "config", None), "_name_or_path", None),
            "estimator": "empirical diagonal Fisher, one row per gradient, general tokens only",
            "fisher_rows": cfg.fisher_rows,
            "rows": len(batches),
            "rows_sha256": rows_digest(batches),
            "general_sources": sorted(context.source_names.get(i, str(i)) for i in context.general_sources),
        }
        path = Path(context.output_dir) / EWC_FISHER
        fisher = load_fisher(path, settings, targets.shapes())
        estimated, seconds = fisher is None, 0.0
        if estimated:
            start = time.perf_counter()
            fisher = estimate_fisher(model, targets, batches)
            seconds = time.perf_counter() - start
            log.info("ewc: Fisher estimated on %d general training rows in %.1f s", len(batches), seconds)
            if is_main_process():
                save_fisher(path, fisher, settings)
        else:
            log.info("ewc: Fisher loaded from %s (%d general rows)", path, len(batches))
        term = cls(cfg.weight, targets, fisher)
        term.estimated, term.fisher_seconds = estimated, seconds
        return term

    def weighted_drift(self) -> torch.Tensor:
        """sum F * (theta - theta_base)^2 over the watched weights (F normalised), with gradients."""
        parts = [SquaredDistance.apply(p, ref, self.fisher[name]) for name, p, ref in self.targets.direct]
        for u in self.targets.updates:
            A, B, scale = u.factors()
            parts.append(WeightedUpdateNorm.apply(A, B, self.fisher[base_weight_name(u)], scale))
        return total(parts)

    def __call__(self, model: Any, inputs: Any, outputs: Any):
        device = next(iter(self.fisher.values())).device.type
        with torch.autocast(device, enabled=False):
            value = self.weight / 2 * self.weighted_drift()
        return value, {"loss/ewc": value.detach()}


def load_fisher(
    path: Path, settings: dict[str, Any], shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor] | None:
    """The Fisher saved at `path` when it was estimated with `settings` for weights of these shapes,
    else None (with a log line saying why it is estimated again)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
        fisher = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        log.warning("ewc: %s cannot be read (%s): estimating the Fisher again", path, e)
        return None
    changed = sorted(k for k in {**recorded, **settings} if recorded.get(k) != settings.get(k))
    if changed:
        log.info("ewc: %s was estimated with other %s: estimating the Fisher again", path, ", ".join(changed))
        return None
    if {name: tuple(f.shape) for name, f in fisher.items()} != shapes:
        log.info("ewc: %s holds other weights than this model trains: estimating the Fisher again", path)
        return None
    return fisher


def save_fisher(path: Path, fisher: dict[str, torch.Tensor], settings: dict[str, Any]) -> None:
    """Write the Fisher with its settings, atomically (a reader never sees half a file)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    save_file(
        {name: f.contiguous().cpu() for name, f in fisher.items()},
        str(partial),
        metadata={METADATA_KEY: json.dumps(settings, sort_keys=True)},
    )
    os.replace(partial, path)


def check_ewc(train_cfg: TrainConfig, prepared: Prepared) -> None:
    """Before any model loads, what `ewc` needs: general training rows that record which source each token
    came from (sharded weights are refused for every regularizer in `check_regularizers`)."""
    if train_cfg.regularize.ewc.weight <= 0:
        return
    where = "train.regularize.ewc.weight"
    general = prepared.general_training_sources
    if not general:
        raise CptkitError(
            f"{where}: EWC estimates its Fisher on general (replay) training rows, but {prepared.folder} "
            "trains on no general source; add one to data.sources (role: general, weight > 0, or type: "
            "self_replay) and prepare again, or set the weight to 0"
        )
    if not any(name in prepared.source_index for name in general):
        raise CptkitError(
            f"{where}: the training rows of {prepared.folder} do not record which source each token came "
            "from; run `cptkit prepare` again (with this version of cptkit) to add it"
        )

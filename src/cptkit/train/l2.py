"""`l2_to_base`: the squared distance of the trained weights from the base model's, as a loss term.

Full fine-tuning: the sum over trainable parameters of ||p - p0||^2, with p0 a frozen copy of the
trainable weights taken when the term is built. `cptkit train` builds its terms right after loading the
base model and before the Trainer loads a checkpoint to resume from, so p0 is always the base's weights,
a resumed run included; the copy costs one more set of the trainable weights in device memory (logged).

LoRA/QLoRA: the base weights never move, only the update `scale * B @ A` of each adapted module does.
Its squared Frobenius norm is `scale^2 * trace((B^T B)(A A^T))`, two r x r products, so the d_out x d_in
update is never formed. peft's `modules_to_save` (embeddings and lm_head trained in full) are compared
with the original module peft keeps beside them, which needs no copy.

The drift is a property of the weights, not of the batch: the term returns the whole penalty at every
micro-batch and the trainer's scaling for gradient accumulation (each of the k micro-batches counted
1/k) adds it up to one penalty per optimizer step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cptkit.config.train import TrainConfig
    from cptkit.train.losses import LossContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraUpdate:
    """One adapted module's update `scale * B @ A` (peft's active adapter `adapter` of `module`)."""

    name: str
    module: Any
    adapter: str

    @property
    def is_embedding(self) -> bool:
        return self.adapter in getattr(self.module, "lora_embedding_A", {})

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A as r x d_in, B as d_out x r, scale); scale is peft's, so rslora's alpha / sqrt(r) too.
        An embedding's update is (B @ A)^T: the same norm."""
        m, a = self.module, self.adapter
        if self.is_embedding:
            A, B = m.lora_embedding_A[a], m.lora_embedding_B[a]
        else:
            A, B = m.lora_A[a].weight, m.lora_B[a].weight
        return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1), float(m.scaling[a])


def lora_updates(model: Any) -> list[LoraUpdate]:
    """Every active adapter of every peft LoRA layer in `model` (none for a model without adapters)."""
    from peft.tuners.lora import LoraLayer

    updates = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A or adapter in module.lora_embedding_A:
                    updates.append(LoraUpdate(name, module, adapter))
    return updates


def saved_module_pairs(model: Any) -> Iterator[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(name, trained parameter, its initial value) for the modules peft trains in full
    (`modules_to_save`): the trained copy against the frozen original beside it."""
    from peft.utils.other import ModulesToSaveWrapper

    for name, module in model.named_modules():
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        for adapter in module.active_adapters:
            copy = module.modules_to_save[adapter]
            originals = dict(module.original_module.named_parameters())
            for pname, param in copy.named_parameters():
                if param.requires_grad:
                    yield f"{name}.modules_to_save.{adapter}.{pname}", param, originals[pname].detach()


def frozen_copies(model: Any) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(name, parameter, a frozen copy of its value now) for every trainable parameter (full mode)."""
    return [(n, p, p.detach().clone()) for n, p in model.named_parameters() if p.requires_grad]


def update_norm(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """||scale * B @ A||_F^2 through r x r products: trace((B^T B)(A A^T)) * scale^2 (both symmetric, so
    the trace is the sum of their elementwise product)."""
    A, B = A.float(), B.float()
    return scale**2 * ((B.T @ B) * (A @ A.T)).sum()


class SquaredDistance(torch.autograd.Function):
    """sum(F * (p - p0)^2) (F = 1 when None) whose backward forms 2 F (p - p0) again instead of keeping
    it: autograd would hold a float32 difference of every parameter until the backward pass."""

    @staticmethod
    def forward(ctx, param, reference, fisher=None):
        ctx.save_for_backward(param, reference, fisher)
        diff = param.float() - reference.float()
        return (diff.square() if fisher is None else fisher * diff.square()).sum()

    @staticmethod
    def backward(ctx, grad_output):
        param, reference, fisher = ctx.saved_tensors
        diff = param.float() - reference.float()
        grad = 2 * diff if fisher is None else 2 * fisher * diff
        return (grad * grad_output).to(param.dtype), None, None


def total(values: list[torch.Tensor]) -> torch.Tensor:
    """The sum of scalars that may sit on different devices (a model spread by device_map), on the first's."""
    if not values:
        return torch.zeros(())
    device = values[0].device
    return torch.stack([v.to(device) for v in values]).sum()


def memory_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class L2ToBase:
    """`weight * ||theta - theta_base||^2` over what training moves; logged as `loss/l2_to_base` (the
    weighted penalty) and `regularize/drift_norm` (the unweighted distance, sqrt of the sum)."""

    name = "l2_to_base"

    def __init__(self, weight: float, model: Any, mode: str):
        if weight <= 0:
            raise ValueError("L2ToBase needs a positive weight (0 means: do not build the term)")
        self.weight = weight
        if mode == "full":
            self.updates, self.pairs = [], frozen_copies(model)
            copied = memory_bytes([ref for _, _, ref in self.pairs])
            log.info("l2_to_base: a frozen copy of the base weights takes %.2f GB", copied / 1e9)
        else:
            self.updates, self.pairs = lora_updates(model), list(saved_module_pairs(model))
            if not self.updates:
                raise ValueError(f"mode {mode}: the model has no LoRA layers")

    @classmethod
    def build(cls, train_cfg: TrainConfig, context: LossContext | None) -> L2ToBase:
        """The term `train.regularize.l2_to_base` asks for, on the context's freshly loaded base model."""
        if context is None:
            raise ValueError("l2_to_base needs the LossContext (the model before training)")
        return cls(train_cfg.regularize.l2_to_base.weight, context.model, train_cfg.mode)

    def squared_drift(self) -> torch.Tensor:
        """||theta - theta_base||^2 summed over the trained weights, with gradients."""
        parts = [update_norm(*u.factors()) for u in self.updates]
        parts += [SquaredDistance.apply(p, ref) for _, p, ref in self.pairs]
        return total(parts)

    def __call__(self, model: Any, inputs: Any, outputs: Any):
        with torch.autocast(_device_type(self), enabled=False):  # the r x r products in float32
            drift = self.squared_drift()
        value = self.weight * drift
        return value, {"loss/l2_to_base": value.detach(), "regularize/drift_norm": drift.detach().sqrt()}


def _device_type(term: L2ToBase) -> str:
    first = term.updates[0].factors()[0] if term.updates else term.pairs[0][1] if term.pairs else None
    return first.device.type if first is not None else "cpu"

"""What `merge.scale` (and each point of `eval.interpolate`) does: to one weight, base + scale * (trained -
base), computed in float32, the ends exact (scale 1 is the trained tensor itself, scale 0 the base's, so
a merge at scale 1 is the merge as trained, byte for byte); to a peft LoRA model in memory, the same
without writing anything (`adapter_at_scale`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def interpolated(base: torch.Tensor, trained: torch.Tensor, scale: float) -> torch.Tensor:
    """base + scale * (trained - base); non-float tensors (integer buffers) are the trained ones."""
    if scale == 1 or not trained.is_floating_point():
        return trained
    if scale == 0:
        return base
    b = base.to(trained.device, torch.float32)
    return b + scale * (trained.to(torch.float32) - b)


@contextlib.contextmanager
def adapter_at_scale(model, scale: float) -> Iterator[None]:
    """A peft LoRA model as `merge.scale: scale` merges it: every LoRA layer's scaling times `scale`, every
    trained module copy (modules_to_save) and trained token row (trainable_token_indices) at base + scale *
    (trained - base); all restored on exit."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    except ImportError:  # a peft without trainable tokens: no such rows to scale
        TrainableTokensLayer = ()  # noqa: N806 - isinstance(x, ()) is always False

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
                elif isinstance(module, TrainableTokensLayer) and scale != 1:
                    for name, p in module.trainable_tokens_delta.items():
                        if any(p is q for q, _ in weights):  # a tied head shares the embedding's rows
                            continue
                        start = module.base_layer.weight[module.token_indices[name]]
                        weights.append((p, p.detach().clone()))
                        p.copy_(interpolated(start, p, scale).to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for scaling, saved in scalings:
                scaling.update(saved)
            for p, saved in weights:
                p.copy_(saved)

"""Every evaluated model in turn, loaded as the scoring loads it (the adapter on its base, on the NF4
base for a QLoRA adapter where bitsandbytes runs) and released before the next: what the measurements
beside perplexity (the chat probe, sample generations) run on."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from cptkit.config.evaluate import EvalModel
from cptkit.eval.models import load_tokenizer


def each_model(
    models: Sequence[EvalModel], device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False
) -> Iterator[tuple[EvalModel, Any, Any]]:
    """(spec, model in eval mode, tokenizer) for each model, one in memory at a time."""
    from cptkit.eval.score import load_scored_model

    for spec in models:
        model = load_scored_model(spec, device, dtype, None, trust_remote_code)  # the scoring noted the base
        yield spec, model, model_tokenizer(spec, trust_remote_code)
        del model
        gc.collect()


def model_tokenizer(spec: EvalModel, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with the adapter, else the model's."""
    return load_tokenizer(spec.adapter or spec.path, fallback=spec.path, trust_remote_code=trust_remote_code)

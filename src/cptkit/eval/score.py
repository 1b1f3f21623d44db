"""Scoring models on the evaluation sets: one model at a time is loaded, scored on every set and released,
so an evaluation of several 8B models needs the memory of one."""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from cptkit.config.evaluate import EvalModel
from cptkit.eval.models import load_model, load_tokenizer
from cptkit.eval.perplexity import score_documents, summarize
from cptkit.eval.sets import EvalSet, token_docs
from cptkit.merge.nf4 import nf4_available, nf4_settings

log = logging.getLogger(__name__)


def nf4_base(spec: EvalModel) -> dict[str, Any] | None:
    """The NF4 settings when the adapter is evaluated on the 4-bit base it was trained on: asked for with
    `nf4_base: true`, or by default for a QLoRA adapter (`nf4_base: false` turns it off)."""
    if spec.adapter is None or spec.nf4_base is False:
        return None
    from cptkit.merge.adapter import training_mode

    mode, quant = training_mode(spec.adapter)
    if not (spec.nf4_base or mode == "qlora"):
        return None
    return nf4_settings(quant)


def load_scored_model(
    spec: EvalModel,
    device: torch.device,
    dtype: torch.dtype,
    notes: list[str] | None,
    trust_remote_code: bool = False,
):
    """The model `spec` names, loaded as eval scores it: a QLoRA adapter on the NF4 round trip of its base
    where bitsandbytes runs, else (said in `notes`, and logged, unless `notes` is None: the measures
    after the scoring load the same way and say nothing more) on the original base."""
    nf4 = nf4_base(spec)
    if nf4 is not None and (reason := nf4_available(device)):
        if notes is not None:
            notes.append(f"{spec.name}: {reason}; the adapter was evaluated on the original base instead")
            log.warning(notes[-1])
        nf4 = None
    return load_model(
        spec.path, device, dtype, adapter=spec.adapter, nf4=nf4, trust_remote_code=trust_remote_code
    )


def score_model(
    spec: EvalModel,
    sets: list[EvalSet],
    seq_length: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    notes: list[str],
    trust_remote_code: bool = False,
    model: Any = None,
) -> list[dict[str, Any]]:
    """One result row per set for one model (loaded, scored, released); what was done other than asked
    (the adapter on the original base where bitsandbytes cannot run) is added to `notes`. `model`: the
    model `spec` names, already loaded (the points of eval.interpolate), scored as it is."""
    if model is None:
        model = load_scored_model(spec, device, dtype, notes, trust_remote_code)
    tokenizer = load_tokenizer(
        spec.adapter or spec.path, fallback=spec.path, trust_remote_code=trust_remote_code
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for s in sets:
        docs = token_docs(s, tokenizer)
        scores = score_documents(model, docs, seq_length, batch_size, pad, desc=f"{spec.name} / {s.name}")
        nats, tokens = scores.total_nats, scores.total_tokens
        rows.append(
            {
                "model": spec.name,
                "set": s.name,
                "role": s.role,
                **summarize(nats, tokens, s.total_bytes),
                "tokens": tokens,
                "bytes": s.total_bytes,
                "documents": len(s.texts),
                "nats": nats,
                "doc_nats": scores.nats,  # per document, for the bootstrap interval of each delta
                "doc_tokens": scores.tokens,
            }
        )
    del model
    gc.collect()
    return rows


def score_models(
    models: list[EvalModel],
    sets: list[EvalSet],
    seq_length: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every model on every set, in the order given: (result rows, notes). Models that need their own
    code load only with `trust_remote_code`."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for spec in models:
        rows += score_model(spec, sets, seq_length, batch_size, device, dtype, notes, trust_remote_code)
    return rows, notes

"""`cptkit eval CONFIG.yaml`: loss, perplexity and bits-per-byte of models on the held-out sets, and the
change against the base model (domain gain, general forgetting). Writes results.json and results.md."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch

from cptkit.config import Config
from cptkit.config.evaluate import EvalConfig, EvalModel
from cptkit.data.prepared import Prepared
from cptkit.errors import CptkitError
from cptkit.eval.models import load_model, load_tokenizer, pick_device, pick_dtype
from cptkit.eval.perplexity import score_documents, summarize
from cptkit.eval.results import deltas, markdown, print_summary
from cptkit.eval.sets import EvalSet, heldout_sets, text_set, token_docs
from cptkit.merge.nf4 import nf4_available
from cptkit.outputs import now, versions, write_config, write_json
from cptkit.paths import RESULTS, RESULTS_MD, resolve

log = logging.getLogger(__name__)


def main(args) -> int:
    from cptkit.commands import load_for

    run(load_for(args))
    return 0


def run(cfg: Config) -> dict[str, Any]:
    """Score every model on every set; returns results.json's content."""
    ec = cfg.eval or EvalConfig()
    models = ec.models or default_models(cfg)
    if not models:
        raise CptkitError("eval.models: nothing to evaluate: list models, or set model.name_or_path")
    sets, seq_length = _sets(cfg, ec)
    device = pick_device(ec.device)
    dtype = pick_dtype(device, cfg.model.dtype if cfg.model else "auto")
    rows, notes = [], []
    for spec in models:
        rows += _score_model(spec, sets, seq_length, ec.batch_size, device, dtype, notes)
    result = {
        "results": rows,
        "deltas": deltas(rows),
        "seq_length": seq_length,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "models": [vars(m) for m in models],
        "notes": notes,
        "created": now(),
        "versions": versions(),
    }
    out = resolve(cfg).folder("eval")
    write_config(out, cfg)
    write_json(out / RESULTS, result)
    (out / RESULTS_MD).write_text(markdown(rows, result["deltas"]), encoding="utf-8")
    print_summary(rows, result["deltas"])
    log.info("eval results in %s", out)
    return result


def _score_model(
    spec: EvalModel, sets: list[EvalSet], seq_length: int, batch_size: int, device, dtype, notes: list[str]
) -> list[dict[str, Any]]:
    """One result row per set for one model (loaded, scored, released)."""
    nf4 = _nf4(spec)
    if nf4 is not None and (reason := nf4_available(device)):
        notes.append(f"{spec.name}: {reason}; the adapter was evaluated on the original base instead")
        log.warning(notes[-1])
        nf4 = None
    model = load_model(spec.path, device, dtype, adapter=spec.adapter, nf4=nf4)
    tokenizer = load_tokenizer(spec.adapter or spec.path, fallback=spec.path)
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
            }
        )
    del model
    gc.collect()
    return rows


def default_models(cfg: Config) -> list[EvalModel]:
    """base; the trained adapter on the base (or the trained full model); the merged model if it exists."""
    if cfg.model is None:
        return []
    base, paths = cfg.model.name_or_path, resolve(cfg)
    models = [EvalModel(name="base", path=base)]
    train = paths.train
    if train is not None and (Path(train) / "adapter_config.json").is_file():
        models.append(EvalModel(name="adapted", path=base, adapter=str(train)))
    elif train is not None and (Path(train) / "config.json").is_file():
        models.append(EvalModel(name="adapted", path=str(train)))
    else:
        log.warning("no trained model in %s: evaluating without it", train)
    merged = paths.merged
    if merged is not None and (Path(merged) / "config.json").is_file():
        models.append(EvalModel(name="merged", path=str(merged)))
    return models


def _sets(cfg: Config, ec: EvalConfig) -> tuple[list[EvalSet], int]:
    dataset = resolve(cfg).eval_dataset
    sets: list[EvalSet] = []
    seq_length = ec.seq_length or (cfg.data.seq_length if cfg.data else None)
    if dataset and (ec.dataset or dataset.exists() or not ec.extra_texts):
        prepared = Prepared.load(dataset)
        sets += heldout_sets(prepared, ec.max_documents)
        seq_length = seq_length or prepared.seq_length
    sets += [text_set(t.name, t.path, t.role, t.text_field, ec.max_documents) for t in ec.extra_texts]
    if not sets:
        raise CptkitError(
            f"eval: no sets to evaluate: {dataset} has no held-out sets and eval.extra_texts is empty"
        )
    return sets, seq_length or 2048


def _nf4(spec: EvalModel) -> dict[str, Any] | None:
    """The NF4 settings when the adapter is evaluated on the 4-bit base it was trained on."""
    if spec.adapter is None or spec.nf4_base is False:
        return None
    from cptkit.merge.adapter import training_mode

    mode, quant = training_mode(spec.adapter)
    if not (spec.nf4_base or mode == "qlora"):
        return None
    return {
        "quant_type": quant.get("quant_type", "nf4"),
        "double_quant": bool(quant.get("double_quant", True)),
        "dtype": getattr(torch, str(quant.get("compute_dtype", "bfloat16"))),
    }

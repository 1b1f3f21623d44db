"""`cptkit eval CONFIG.yaml`: loss, perplexity and bits-per-byte of models on the held-out sets, and the
change against the base model (domain gain, general forgetting). Writes results.json and results.md."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cptkit.config import Config
from cptkit.config.evaluate import EvalConfig, EvalModel
from cptkit.data.prepared import Prepared
from cptkit.errors import CptkitError
from cptkit.eval.chat_probe import prepare_probe
from cptkit.eval.interpolate import plan_sweep, run_sweep
from cptkit.eval.models import pick_device, pick_dtype
from cptkit.eval.results import print_summary, results_record, write_results
from cptkit.eval.samples import generate_samples
from cptkit.eval.score import score_models
from cptkit.eval.sets import EvalSet, heldout_sets, text_set
from cptkit.eval.task_results import append_tasks_markdown, print_task_summary
from cptkit.eval.tasks import check_tasks, score_tasks
from cptkit.eval.tradeoff import print_sweep, sweep_summary
from cptkit.outputs import write_config
from cptkit.paths import RESULTS_MD, resolve

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
    tasks = check_tasks(ec.tasks)  # found offline before any model loads
    device = pick_device(ec.device)
    dtype = pick_dtype(device, cfg.model.dtype if cfg.model else "auto")
    trust = bool(cfg.model and cfg.model.trust_remote_code)
    budget = cfg.train.forgetting_budget if cfg.train else None
    sweep = plan_sweep(ec.interpolate, models, budget, device=device, dtype=dtype, trust_remote_code=trust)
    probe = prepare_probe(ec.chat_probe, cfg.sft, models, trust)  # refused here, before any model loads
    rows, notes = score_models(
        models, sets, seq_length, ec.batch_size, device, dtype, trust_remote_code=trust
    )
    point_rows, point_tasks = run_sweep(sweep, sets, seq_length, ec.batch_size, tasks) if sweep else ([], {})
    result = results_record(rows + point_rows, models, notes, seq_length, device, dtype, ec.bootstrap)
    if sweep is not None:
        result["interpolation"] = sweep_summary(sweep, rows + point_rows)
    result.update(score_tasks(models, tasks, device, dtype, ec.batch_size, trust, scored=point_tasks))
    if probe is not None:
        result["chat_probe"] = probe.run(
            models, device, dtype, seq_length, ec.batch_size, trust, ec.bootstrap
        )
    if samples := generate_samples(ec.samples, models, sets, device, dtype, trust):
        result["samples"] = samples
    out = resolve(cfg).folder("eval")
    write_config(out, cfg)
    write_results(out, result)
    append_tasks_markdown(out / RESULTS_MD, result)
    print_summary(rows + point_rows, result["deltas"])
    if sweep is not None:
        print_sweep(result["interpolation"])
    print_task_summary(result)
    log.info("eval results in %s", out)
    return result


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

"""One training run's lifecycle, shared by `cptkit train` and `cptkit sft`: run_meta.json says running,
the Trainer trains (continuing a checkpoint's token count on resume), a NaN/inf stop is recorded as
failed and raised, the model is saved, and run_meta.json says complete with the run's summary."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cptkit.errors import CptkitError
from cptkit.model.pickles import check_resumable
from cptkit.train.meta import write_run_meta

log = logging.getLogger(__name__)


def fit(
    trainer: Any,
    callbacks: dict[str, Any],
    output_dir: str | Path,
    meta: dict[str, Any],
    resume_from: str | None = None,
    summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `trainer` (from `build_trainer`, with its `callbacks`) into `output_dir`.

    `meta` goes into run_meta.json before training; `summary` joins the measured summary written as
    run_meta.json's `final` and returned. Only the main process writes files."""
    check_resumable(resume_from)
    main_process = trainer.args.process_index == 0
    if main_process:
        write_run_meta(output_dir, status="running", resumed_from=resume_from, **meta)
    if resume_from:
        log.info("resuming from %s", resume_from)
        callbacks["throughput"].restore(resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    stopped = callbacks["non_finite"].message
    if stopped:
        if main_process:
            write_run_meta(output_dir, status="failed", error=stopped)
        raise CptkitError(stopped)
    trainer.save_model(str(output_dir))
    final = {**run_summary(result, callbacks, output_dir), **(summary or {})}
    if main_process:
        write_run_meta(output_dir, status="complete", final=final)
    return final


def run_summary(result: Any, callbacks: dict[str, Any], output_dir: str | Path) -> dict[str, Any]:
    """Steps, losses, tokens, speed and the last held-out numbers of each set."""
    last_eval: dict[str, dict] = {}
    for r in callbacks["heldout"].results:
        last_eval[r["set"]] = {
            k: r[k] for k in ("role", "loss", "perplexity", "bits_per_byte", "tokens", "step")
        }
    throughput = callbacks["throughput"]
    return {
        "output_dir": str(output_dir),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "trained_tokens": throughput.trained_tokens,
        **{k: throughput.last.get(k) for k in ("tokens_per_second", "mfu", "peak_memory_gb")},
        "heldout": last_eval,
    }

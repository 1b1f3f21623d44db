"""One training run's lifecycle, shared by `cptkit train` and `cptkit sft`: the folder made ready (what a
killed save left removed, metrics.jsonl cut back to the checkpoint resumed), run_meta.json says running,
the Trainer trains (continuing a checkpoint's token count on resume), a stop by the divergence guard is
recorded as failed and raised, the model is saved, and run_meta.json says complete with the summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cptkit.disk import FreeSpace, free_bytes
from cptkit.errors import CptkitError
from cptkit.model.pickles import check_resumable
from cptkit.paths import METRICS, RUN_META
from cptkit.train.budget import budget_text
from cptkit.train.checkpoints import (
    check_same_batch,
    remove_unfinished,
    set_aside_diverged,
    set_aside_newer,
    truncate_metrics,
)
from cptkit.train.guard import report_divergence
from cptkit.train.meta import write_run_meta
from cptkit.train.space import check_checkpoint_space, failing_on_full_disk

log = logging.getLogger(__name__)


def fit(
    trainer: Any,
    callbacks: dict[str, Any],
    output_dir: str | Path,
    meta: dict[str, Any],
    resume_from: str | None = None,
    summary: dict[str, Any] | None = None,
    free_space: FreeSpace = free_bytes,
) -> dict[str, Any]:
    """Train `trainer` (from `build_trainer`, with its `callbacks`) into `output_dir`.

    `meta` goes into run_meta.json before training; `summary` joins the measured summary written as
    run_meta.json's `final` and returned. Only the main process writes files. A disk that cannot hold
    a checkpoint (`free_space(path)`: free bytes) is refused first; one that fills is a failed run."""
    check_resumable(resume_from)
    check_same_batch(resume_from, getattr(trainer, "settings", None))
    main_process = trainer.args.process_index == 0
    check_checkpoint_space(trainer, output_dir, free_space)
    if main_process:
        prepare_folder(output_dir, meta.get("identity"), resume_from)
        write_run_meta(
            output_dir,
            status="running",
            resumed_from=resume_from,
            error=None,
            diverged=None,
            forgetting_budget=None,
            **meta,
        )
    trainer.accelerator.wait_for_everyone()  # the other ranks start once the folder is ready
    if resume_from:
        log.info("resuming from %s", resume_from)
        callbacks["throughput"].restore(resume_from)
    try:
        with failing_on_full_disk(trainer, output_dir):
            result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        if "stall" in callbacks:  # a failed run's watch ends too (on_train_end ends a finished one's)
            callbacks["stall"].stop()
    verdict = callbacks["guard"].verdict
    if verdict is not None:
        message, record = report_divergence(output_dir, verdict, write=main_process)
        if main_process:
            write_run_meta(output_dir, status="failed", error=message, diverged=record)
        raise CptkitError(message)
    with failing_on_full_disk(trainer, output_dir):
        trainer.save_model(str(output_dir))
    final = {**run_summary(result, callbacks, output_dir), **(summary or {})}
    if main_process:
        write_run_meta(
            output_dir, status="complete", final=final, forgetting_budget=final.get("forgetting_budget")
        )
    return final


def prepare_folder(output_dir: str | Path, identity: str | None, resume_from: str | None) -> None:
    """Before a run of `identity` trains into `output_dir`: when the folder is this run's, remove the
    checkpoints a killed save left, set the diverged ones aside and keep metrics.jsonl only up to the
    step resumed (nothing when training starts over), so each step is logged once."""
    meta_path = Path(output_dir) / RUN_META
    recorded = json.loads(meta_path.read_text()).get("identity") if meta_path.is_file() else None
    if resume_from is None and (recorded is None or recorded != identity):
        return  # a new folder, or files no run of this identity wrote: nothing here is ours to change
    remove_unfinished(output_dir)
    set_aside_diverged(output_dir, resume_from)
    set_aside_newer(output_dir, resume_from)
    step = -1
    if resume_from is not None:
        step = json.loads((Path(resume_from) / "trainer_state.json").read_text())["global_step"]
    dropped = truncate_metrics(Path(output_dir) / METRICS, step)
    if dropped:
        log.info(
            "metrics.jsonl: %d lines after step %d removed (they are trained again)", dropped, max(step, 0)
        )


def run_summary(result: Any, callbacks: dict[str, Any], output_dir: str | Path) -> dict[str, Any]:
    """Steps, losses, tokens, speed, the last held-out numbers of each set and, with a forgetting budget,
    its record (`ForgettingBudget.record`: the best checkpoint within it, logged here)."""
    last_eval: dict[str, dict] = {}
    for r in callbacks["heldout"].results:
        last_eval[r["set"]] = {
            k: r[k] for k in ("role", "loss", "perplexity", "bits_per_byte", "tokens", "step")
        }
    throughput = callbacks["throughput"]
    budget = callbacks["heldout"].budget
    extra = {}
    if budget is not None:
        extra["forgetting_budget"] = budget.record(output_dir)
        log.info(budget_text(extra["forgetting_budget"]))
    return {
        "output_dir": str(output_dir),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "trained_tokens": throughput.trained_tokens,
        **{k: throughput.last.get(k) for k in ("tokens_per_second", "mfu", "peak_memory_gb")},
        "heldout": last_eval,
        **extra,
    }

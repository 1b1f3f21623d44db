"""`cptkit train CONFIG.yaml`: base model + prepared dataset -> LoRA/QLoRA adapter or full checkpoint.

Every check that needs no weights runs first (dataset, tokenizer, base model, hardware, positions,
output folder); then the model loads, the Trainer trains (resuming where an interrupted run of the
same config stopped), and the folder gets the model, config.yaml, run_meta.json and metrics.jsonl.
Scale out with `accelerate launch --config_file $(python -m cptkit.presets.accelerate fsdp2) -m cptkit
train CONFIG.yaml`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from cptkit.commands import load_for
from cptkit.config import Config
from cptkit.locks import locks_stage_folder
from cptkit.paths import resolve

log = logging.getLogger(__name__)


def main(args) -> int:
    run(load_for(args, "model", "train"))
    return 0


@locks_stage_folder("train")
def run(cfg: Config) -> dict[str, Any]:
    """Train as `cfg.train` says; returns the run's summary (also in run_meta.json)."""
    from transformers import set_seed

    from cptkit.eval.tasks import check_tasks
    from cptkit.model.attention import describe
    from cptkit.model.flops import flops_per_token
    from cptkit.model.load import load_model_and_tokenizer
    from cptkit.outputs import write_config
    from cptkit.train.build import build_trainer
    from cptkit.train.checkpointing import check_plan_fits
    from cptkit.train.checks import preflight
    from cptkit.train.fit import fit
    from cptkit.train.heldout import load_heldout_sets
    from cptkit.train.memory import RunShape

    train_cfg, model_cfg, paths = cfg.train, cfg.model, resolve(cfg)
    dataset_dir, output_dir = paths.prepared or paths.folder("prepare"), paths.folder("train")
    checked = preflight(train_cfg, model_cfg, dataset_dir, output_dir)
    tasks = check_tasks(cfg.eval.tasks if cfg.eval else [], during_training=True)
    prepared, resume_from = checked["prepared"], checked["resume_from"]
    shape = RunShape.of(train_cfg, prepared.seq_length)
    check_plan_fits(model_cfg, train_cfg, shape)
    set_seed(cfg.seed)
    rows = prepared.train_rows()
    loaded = load_model_and_tokenizer(
        model_cfg,
        train_cfg,
        tokenizer=checked["tokenizer"],
        run_shape=shape,
        vocabulary=checked["vocabulary"],
        train_rows=rows if resume_from is None else None,  # checked when the run started
        untrained_rows=train_cfg.untrained_rows,
    )
    eval_sets = load_heldout_sets(prepared, prepared.seq_length, train_cfg.eval_max_tokens)
    flops = flops_per_token(loaded.model, prepared.seq_length)
    trainer, callbacks = build_trainer(
        train_cfg,
        loaded,
        rows,
        eval_sets,
        output_dir,
        flops_per_token=flops,
        seed=cfg.seed,
        prepared=prepared,
        resume_from=resume_from,
        tasks=tasks,
    )
    meta = {
        "identity": checked["identity"],
        "mode": train_cfg.mode,
        "base_model": model_cfg.name_or_path,
        "quantization": asdict(train_cfg.quantization) if train_cfg.mode == "qlora" else None,
        "dataset": str(dataset_dir),
        "dataset_manifest_hash": checked["manifest_hash"],
        "attention": describe(loaded.attention),
        "fused_cross_entropy": loaded.fused_cross_entropy,
        "kernels": loaded.kernels,
        "flops_per_token": flops,
        "causal_halving": False,
        "world_size": trainer.args.world_size,
        "memory_plan": loaded.memory_plan.to_json() if loaded.memory_plan else None,
        "new_tokens": loaded.new_tokens,
        "untrained_rows": loaded.untrained_rows,
    }
    if trainer.args.process_index == 0:
        write_config(output_dir, cfg)
    extra = {"mode": meta["mode"], "attention": meta["attention"]}
    summary = fit(trainer, callbacks, output_dir, meta, resume_from, extra)
    log.info("trained %s steps; model in %s", summary["steps"], output_dir)
    return summary

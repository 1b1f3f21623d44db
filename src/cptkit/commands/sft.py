"""`cptkit sft CONFIG.yaml`: supervised fine-tuning of the (merged) CPT model, the seed's appendix A
step 4. Instruction records (alpaca or chat `messages`) are rendered with the tokenizer's chat template
or the seed's ###System/###Question/###Answer template, labelled -100 on system and prompt tokens,
packed with per-example attention isolation, and trained with the same trainer as `cptkit train`
(full, LoRA or QLoRA). The output folder holds the model or adapter, sft_data.json (what was read,
skipped, truncated, trained), run_meta.json and metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

from cptkit.config import Config
from cptkit.config.model import ModelConfig
from cptkit.errors import CptkitError
from cptkit.locks import locks_stage_folder
from cptkit.paths import SFT_DATA, resolve

log = logging.getLogger(__name__)


def main(args) -> int:
    from cptkit.commands import load_for

    run(load_for(args, "sft"))
    return 0


@locks_stage_folder("sft")
def run(cfg: Config) -> dict[str, Any]:
    """Fine-tune as `cfg.sft` says; returns the run's summary (also in run_meta.json)."""
    from datasets import Dataset
    from transformers import set_seed

    from cptkit.model.load import load_model_and_tokenizer
    from cptkit.outputs import write_config, write_json
    from cptkit.sft.data import build_sft_data
    from cptkit.sft.formats import read_conversations
    from cptkit.train.build import build_trainer
    from cptkit.train.checkpointing import check_plan_fits
    from cptkit.train.checks import check_training_run
    from cptkit.train.fit import fit
    from cptkit.train.heldout import HeldoutSet
    from cptkit.train.memory import RunShape

    sft_cfg, output_dir = cfg.sft, resolve(cfg).folder("sft")
    records = read_conversations(sft_cfg.data, sft_cfg.format, sft_cfg.system_prompt)  # data errors first
    model_cfg = _model_config(cfg)
    start = check_training_run(sft_cfg, model_cfg, _data_hash(sft_cfg), output_dir, section="sft")
    identity, resume_from = start.identity, start.resume_from
    shape = RunShape.of(sft_cfg, sft_cfg.seq_length)
    check_plan_fits(model_cfg, sft_cfg, shape)
    set_seed(cfg.seed)
    loaded = load_model_and_tokenizer(model_cfg, sft_cfg, run_shape=shape)
    data = build_sft_data(sft_cfg, loaded.tokenizer, cfg.seed, read=records)
    heldout = [HeldoutSet.from_rows("sft_heldout", "sft", data.heldout_rows)] if data.heldout_rows else []
    rows = Dataset.from_list(data.train_rows)
    trainer, callbacks = build_trainer(sft_cfg, loaded, rows, heldout, output_dir, seed=cfg.seed)
    meta = {"identity": identity, "mode": sft_cfg.mode, "base_model": model_cfg.name_or_path, "stage": "sft"}
    meta["memory_plan"] = loaded.memory_plan.to_json() if loaded.memory_plan else None
    if trainer.args.process_index == 0:
        write_config(output_dir, cfg)
        write_json(output_dir / SFT_DATA, data.stats)
    extra = {"base_model": model_cfg.name_or_path, "data": data.stats}
    summary = fit(trainer, callbacks, output_dir, meta, resume_from, extra)
    log.info("sft: %s steps on %s; model in %s", summary["steps"], model_cfg.name_or_path, output_dir)
    return summary


def sft_base_model(cfg: Config) -> str:
    """sft.model, else the merged CPT model, else a fully trained CPT model, else the base model."""
    base = resolve(cfg).sft_base
    if base is not None:
        return base
    raise CptkitError(
        "sft.model: not set, and there is no merged or trained CPT model or model section to start from"
    )


def _model_config(cfg: Config) -> ModelConfig:
    """The model section (attention, dtype) pointed at the model SFT starts from."""
    base = sft_base_model(cfg)
    derived = not cfg.sft.model and (cfg.model is None or base != cfg.model.name_or_path)
    if derived and not Path(base).exists():
        raise CptkitError(
            f"sft: the model to tune, {base}, does not exist yet; run the CPT stages first (cptkit run) or set sft.model"
        )
    if cfg.model is None:
        return ModelConfig(name_or_path=base)
    same = base == cfg.model.name_or_path
    return dataclasses.replace(cfg.model, name_or_path=base, gguf_file=cfg.model.gguf_file if same else None)


def _data_hash(sft_cfg) -> str:
    """What makes two SFT datasets the same: the file's bytes and the rendering settings."""
    h = hashlib.sha256(Path(sft_cfg.data).read_bytes())
    h.update(
        repr(
            (sft_cfg.format, sft_cfg.template, sft_cfg.system_prompt, sft_cfg.seq_length, sft_cfg.packing)
        ).encode()
    )
    return h.hexdigest()[:16]

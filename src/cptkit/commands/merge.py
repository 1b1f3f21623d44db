"""`cptkit merge CONFIG.yaml`: base + LoRA adapter -> a full model folder that plain transformers loads.

The base is streamed shard by shard (see `cptkit.merge.stream`). QLoRA adapters are merged into both the
original and the NF4-dequantised base, compared with the adapter on the 4-bit base, and the closer kept.
Everything is written into a temp folder renamed into place at the end: no half-written model survives
(see `cptkit.merge.run`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cptkit.config import Config
from cptkit.config.evaluate import MergeConfig
from cptkit.errors import CptkitError
from cptkit.merge.run import merge_adapter
from cptkit.outputs import write_config

log = logging.getLogger(__name__)


def main(args) -> int:
    from cptkit.commands import load_for

    run(load_for(args))
    return 0


def run(cfg: Config) -> dict[str, Any]:
    """Merge, check, compare (QLoRA), write; returns merge_report.json's content."""
    mc = cfg.merge or MergeConfig()
    adapter_dir = Path(mc.adapter) if mc.adapter else cfg.stage_dir("train")
    base_name = mc.base or (cfg.model.name_or_path if cfg.model else None)
    if base_name is None:
        raise CptkitError("merge.base: not set, and no model.name_or_path to default to")
    out_dir = cfg.stage_dir("merge")
    dataset = _comparison_dataset(cfg, mc)
    report = merge_adapter(
        base_name, adapter_dir, out_dir, mc, dataset, before_commit=lambda folder: write_config(folder, cfg)
    )
    log.info(
        "merged %s into %s -> %s (%s, %.1f s)",
        adapter_dir,
        report["base"],
        out_dir,
        report["kept"],
        report["resources"]["wall_seconds"],
    )
    return report


def _comparison_dataset(cfg: Config, mc: MergeConfig) -> str | None:
    """The prepared folder whose held-out documents compare the merges of a QLoRA adapter."""
    dataset = mc.dataset or (cfg.train.dataset if cfg.train and cfg.train.dataset else None)
    if dataset is None and (cfg.data is not None or cfg.run_dir):
        dataset = str(cfg.stage_dir("prepare"))
    return dataset

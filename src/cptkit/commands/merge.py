"""`cptkit merge CONFIG.yaml`: base + LoRA adapter -> a full model folder that plain transformers loads;
`merge.scale` < 1 merges the update that part of the way (for a fully fine-tuned model too: base + scale *
(trained - base)).

The base is streamed shard by shard (see `cptkit.merge.stream`). QLoRA adapters are merged into both the
original and the NF4-dequantised base, compared with the adapter on the 4-bit base, and the closer kept.
Everything is written into a temp folder renamed into place at the end: no half-written model survives
(see `cptkit.merge.run`).
"""

from __future__ import annotations

import logging
from typing import Any

from cptkit.config import Config
from cptkit.config.evaluate import MergeConfig
from cptkit.errors import CptkitError
from cptkit.merge.run import merge_adapter
from cptkit.outputs import write_config
from cptkit.paths import resolve

log = logging.getLogger(__name__)


def main(args) -> int:
    from cptkit.commands import load_for

    run(load_for(args))
    return 0


def run(cfg: Config) -> dict[str, Any]:
    """Merge, check, compare (QLoRA), write; returns merge_report.json's content."""
    mc = cfg.merge or MergeConfig()
    paths = resolve(cfg)
    adapter_dir, base_name = paths.adapter or paths.folder("train"), paths.merge_base
    if base_name is None:
        raise CptkitError("merge.base: not set, and no model.name_or_path to default to")
    out_dir = paths.folder("merge")
    report = merge_adapter(
        base_name,
        adapter_dir,
        out_dir,
        mc,
        paths.merge_dataset,
        before_commit=lambda folder: write_config(folder, cfg),
        trust_remote_code=bool(cfg.model and cfg.model.trust_remote_code),
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

"""`cptkit merge CONFIG.yaml`: base + LoRA adapter -> a full model folder that plain transformers loads.

The base is streamed shard by shard (see `cptkit.merge.stream`). QLoRA adapters are merged into both the
original and the NF4-dequantised base, compared with the adapter on the 4-bit base, and the closer kept.
Everything is written into a temp folder renamed into place at the end: no half-written model survives.
"""

from __future__ import annotations

import logging
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cptkit.config import Config
from cptkit.config.evaluate import MergeConfig
from cptkit.data.prepared import Prepared
from cptkit.errors import CptkitError
from cptkit.eval.models import pick_device, pick_dtype
from cptkit.merge.adapter import read_adapter, training_mode
from cptkit.merge.checkpoint import read_checkpoint, resolve_model_folder
from cptkit.merge.compare import compare_candidates, heldout_token_docs
from cptkit.merge.qlora import choose_variant, plan_variants
from cptkit.merge.stream import check_adapter_fits, merge_stream, output_specs, write_model_files
from cptkit.merge.write import atomic_folder, check_disk_space, parse_size
from cptkit.outputs import now, versions, write_config, write_json
from cptkit.paths import MERGE_REPORT, resolve

log = logging.getLogger(__name__)


def main(args) -> int:
    from cptkit.commands import load_for

    run(load_for(args))
    return 0


def run(cfg: Config) -> dict[str, Any]:
    """Merge, check, compare (QLoRA), write; returns merge_report.json's content."""
    mc = cfg.merge or MergeConfig()
    start = time.perf_counter()
    paths = resolve(cfg)
    adapter_dir, base_name = paths.adapter or paths.folder("train"), paths.merge_base
    if base_name is None:
        raise CptkitError("merge.base: not set, and no model.name_or_path to default to")
    out_dir = paths.folder("merge")
    adapter = read_adapter(adapter_dir)
    base = read_checkpoint(resolve_model_folder(base_name))
    check_adapter_fits(base, adapter)
    mode, quant = training_mode(adapter_dir, fallback=None if mc.mode == "auto" else mc.mode)
    mode = mc.mode if mc.mode != "auto" else mode
    dtype, device = getattr(torch, mc.dtype), pick_device(mc.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with atomic_folder(out_dir) as tmp:
        variants, notes = plan_variants(mode, quant, device, tmp)
        needed = sum(s.nbytes for s in output_specs(base, adapter, dtype))
        check_disk_space(out_dir, needed * len(variants))
        for v in variants:
            v.folder.mkdir(parents=True, exist_ok=True)
        stats = merge_stream(base, adapter, variants, dtype, parse_size(mc.max_shard_size), device)
        tokenizer_from = [write_model_files(v.folder, base, adapter, dtype) for v in variants][0]
        stats["merge_phase"] = _usage(start, device)  # the streaming merge alone, before any comparison
        comparison = _compare(cfg, mc, base, adapter_dir, variants, device) if len(variants) > 1 else None
        chosen, why = choose_variant(variants, comparison, mc.qlora_base)
        _promote(chosen.folder, tmp)
        report = {
            "created": now(),
            "base": str(base.folder),
            "adapter": str(adapter_dir),
            "mode": mode,
            "dtype": mc.dtype,
            "device": str(device),
            "kept": chosen.name,
            "why": why,
            "notes": notes,
            "variants": [v.name for v in variants],
            "comparison": comparison,
            "tokenizer_from": tokenizer_from,
            **stats,
            "resources": _usage(start, device),
            "versions": versions(),
        }
        write_config(tmp, cfg)
        write_json(tmp / MERGE_REPORT, report)
    log.info(
        "merged %s into %s -> %s (%s, %.1f s)",
        adapter_dir,
        base.folder,
        out_dir,
        chosen.name,
        report["resources"]["wall_seconds"],
    )
    return report


def _compare(
    cfg: Config, mc: MergeConfig, base, adapter_dir: Path, variants, device
) -> dict[str, Any] | None:
    dataset = resolve(cfg).merge_dataset
    docs = (
        heldout_token_docs(Prepared.load(dataset), mc.compare_documents, mc.compare_tokens)
        if dataset and dataset.exists()
        else []
    )
    if not docs:
        log.warning("no held-out documents found (dataset %s): the QLoRA merges are not compared", dataset)
        return None
    quant = next(v.quant for v in variants if v.quant is not None)
    return compare_candidates(
        base.folder,
        adapter_dir,
        {v.name: v.folder for v in variants},
        docs,
        quant,
        device,
        pick_dtype(device),
        seq_length=max(len(d) for d in docs),
    )


def _promote(chosen: Path, root: Path) -> None:
    """Move the kept variant's files to the output's root and drop the other variants."""
    if chosen == root:
        return
    for f in chosen.iterdir():
        shutil.move(str(f), root / f.name)
    for sub in [p for p in root.iterdir() if p.is_dir()]:
        shutil.rmtree(sub)


def _usage(start: float, device: torch.device) -> dict[str, Any]:
    usage = {
        "wall_seconds": round(time.perf_counter() - start, 2),
        "peak_cpu_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
    }
    if device.type == "cuda":
        usage["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return usage

"""One merge from start to end: read and check the adapter and the base, stream the merge of every variant
into a temp folder, compare the variants (QLoRA), keep one, and write its report; the temp folder replaces
the output folder only when all of it succeeded. A fully fine-tuned model is merged only part of the way
back to its base (merge.scale < 1): base + scale * (trained - base)."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cptkit.config.evaluate import MergeConfig
from cptkit.data.prepared import Prepared
from cptkit.eval.models import pick_device, pick_dtype
from cptkit.merge.adapter import LoraAdapter, read_adapter, training_mode
from cptkit.merge.checkpoint import Checkpoint, read_checkpoint, resolve_model_folder
from cptkit.merge.compare import compare_candidates, heldout_token_docs
from cptkit.merge.full import check_same_model, is_full_model, write_interpolated
from cptkit.merge.qlora import choose_variant, plan_variants
from cptkit.merge.rows import check_tokenizer_fits, is_input_embedding
from cptkit.merge.stream import (
    Variant,
    check_adapter_fits,
    keep_head_tied,
    merge_stream,
    output_specs,
    output_vocab_size,
    tokenizer_folder,
    write_model_files,
)
from cptkit.merge.write import atomic_folder, check_disk_space, parse_size, promote
from cptkit.outputs import now, versions, write_json
from cptkit.paths import MERGE_REPORT

log = logging.getLogger(__name__)


def merge_full(
    base_name: str,
    trained_dir: Path,
    out_dir: Path,
    mc: MergeConfig,
    before_commit: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Write base + merge.scale * (trained - base) of a fully fine-tuned model into `out_dir`, streamed
    like the adapter merge; returns merge_report.json's content."""
    start = time.perf_counter()
    trained = read_checkpoint(trained_dir)
    base = read_checkpoint(resolve_model_folder(base_name))
    check_same_model(base, trained)
    embedding = [t for k, t in trained.tensors.items() if is_input_embedding(k)]
    rows = embedding[0].shape[0] if len(embedding) == 1 else None
    check_tokenizer_fits(tokenizer_folder([trained_dir, base.folder]), rows, trained_dir)
    with atomic_folder(out_dir) as tmp:
        stats = write_interpolated(
            base, trained, tmp, mc.scale, getattr(torch, mc.dtype), parse_size(mc.max_shard_size)
        )
        report = {
            "created": now(),
            "base": str(base.folder),
            "adapter": str(trained_dir),
            "mode": "full",
            "scale": mc.scale,
            "dtype": mc.dtype,
            "device": "cpu",
            "kept": "interpolated",
            "why": f"base + {mc.scale:g} * (trained - base)",
            "notes": [],
            **stats,
            "resources": resource_usage(start, torch.device("cpu")),
            "versions": versions(),
        }
        if before_commit is not None:
            before_commit(tmp)
        write_json(tmp / MERGE_REPORT, report)
    return report


def merge_adapter(
    base_name: str,
    adapter_dir: Path,
    out_dir: Path,
    mc: MergeConfig,
    dataset: str | Path | None = None,
    before_commit: Callable[[Path], None] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Merge the adapter in `adapter_dir` into `base_name` and write the model into `out_dir`; returns
    merge_report.json's content. `dataset` is the prepared folder whose held-out documents compare QLoRA
    merges; `before_commit(folder)` writes further files (config.yaml) into the output before it is moved
    into place, so that a failure there leaves the previous output too. A fully fine-tuned model in
    `adapter_dir` is merged at merge.scale < 1 (`merge_full`); at 1 there is nothing to merge."""
    if is_full_model(adapter_dir) and mc.scale < 1:
        return merge_full(base_name, adapter_dir, out_dir, mc, before_commit)
    start = time.perf_counter()
    adapter = read_adapter(adapter_dir)
    base = read_checkpoint(resolve_model_folder(base_name))
    keep_head_tied(base, adapter)
    check_adapter_fits(base, adapter)
    check_tokenizer_fits(
        tokenizer_folder([adapter.folder, base.folder]), output_vocab_size(base, adapter), adapter_dir
    )
    mode, quant = training_mode(adapter_dir, fallback=None if mc.mode == "auto" else mc.mode)
    mode = mc.mode if mc.mode != "auto" else mode
    dtype, device = getattr(torch, mc.dtype), pick_device(mc.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with atomic_folder(out_dir) as tmp:
        variants, notes = plan_variants(mode, quant, device, tmp)
        stats = _write_variants(base, adapter, variants, dtype, device, mc, out_dir)
        stats["merge_phase"] = resource_usage(start, device)  # the streaming merge alone, before comparing
        comparison = compare_variants(base, adapter_dir, variants, dataset, mc, device, trust_remote_code)
        chosen, why = choose_variant(variants, comparison, mc.qlora_base)
        promote(chosen.folder, tmp)
        report = {
            "created": now(),
            "base": str(base.folder),
            "adapter": str(adapter_dir),
            "mode": mode,
            "scale": mc.scale,
            "dtype": mc.dtype,
            "device": str(device),
            "kept": chosen.name,
            "why": why,
            "notes": notes,
            "variants": [v.name for v in variants],
            "comparison": comparison,
            **stats,
            "resources": resource_usage(start, device),
            "versions": versions(),
        }
        if before_commit is not None:
            before_commit(tmp)
        write_json(tmp / MERGE_REPORT, report)
    return report


def _write_variants(
    base: Checkpoint,
    adapter: LoraAdapter,
    variants: list[Variant],
    dtype: torch.dtype,
    device: torch.device,
    mc: MergeConfig,
    out_dir: Path,
) -> dict[str, Any]:
    """Every variant's weights (one streaming pass) and files; the merge's counts and `tokenizer_from`."""
    needed = sum(s.nbytes for s in output_specs(base, adapter, dtype))
    check_disk_space(out_dir, needed * len(variants))
    for v in variants:
        v.folder.mkdir(parents=True, exist_ok=True)
    stats = merge_stream(base, adapter, variants, dtype, parse_size(mc.max_shard_size), device, mc.scale)
    tokenizer_from = [write_model_files(v.folder, base, adapter, dtype) for v in variants][0]
    return {"tokenizer_from": tokenizer_from, **stats}


def compare_variants(
    base: Checkpoint,
    adapter_dir: Path,
    variants: list[Variant],
    dataset: str | Path | None,
    mc: MergeConfig,
    device: torch.device,
    trust_remote_code: bool = False,
) -> dict[str, Any] | None:
    """The variants measured against the adapter on the 4-bit base, on held-out documents of `dataset`;
    None when there is only one variant or no held-out document to compare on."""
    if len(variants) < 2:
        return None
    docs = (
        heldout_token_docs(Prepared.load(dataset), mc.compare_documents, mc.compare_tokens)
        if dataset and Path(dataset).exists()
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
        trust_remote_code=trust_remote_code,
        scale=mc.scale,
    )


def resource_usage(start: float, device: torch.device) -> dict[str, Any]:
    """Wall time since `start`, the process's peak resident memory, and the GPU's peak memory."""
    usage = {
        "wall_seconds": round(time.perf_counter() - start, 2),
        "peak_cpu_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
    }
    if device.type == "cuda":
        usage["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return usage

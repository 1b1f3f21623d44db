"""`cptkit prepare CONFIG.yaml`: raw corpora -> tokenized, chunked, mixed, packed dataset + held-out sets.

read -> normalise -> filter -> tokenize (cached per shard of input files) -> dedup -> held-out split ->
chunk -> mix -> pack -> write. A rerun on unchanged inputs and settings does nothing; a rerun after
changing only what comes after tokenization reuses the cached ids; an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from cptkit.config import Config
from cptkit.data import readers
from cptkit.data.hashing import HashCache, digest
from cptkit.data.manifest import FORMAT_VERSION, MANIFEST
from cptkit.data.shards import (
    ShardStats,
    Tokenizing,
    cached_stats,
    open_shard,
    plan_shards,
    settings_for,
    tokenization_unit,
    tokenize_shard,
    usable_cores,
)
from cptkit.data.tokenize import Encoder, describe, load_tokenizer
from cptkit.errors import CptkitError
from cptkit.outputs import now, versions, write_config, write_json

log = logging.getLogger(__name__)
CACHE = "cache"


def main(args) -> int:
    from cptkit.commands import load_for
    from cptkit.data.summary import print_summary

    cfg = load_for(args, "data")
    manifest = run(cfg, force=getattr(args, "force", False))
    print_summary(manifest)
    return 0


def run(cfg: Config, force: bool = False) -> dict[str, Any]:
    """Prepare `cfg.data` into `cfg.stage_dir("prepare")`; returns the manifest."""
    data = cfg.data
    out = cfg.stage_dir("prepare")
    cache_dir = out / CACHE
    tok = load_tokenizer(data.tokenizer, data.trust_remote_code)
    tokinfo = describe(tok, data.tokenizer)
    plans = {
        s.name: readers.plan_source(s.path, s.text_field, f"data.sources[{i}] ({s.name})")
        for i, s in enumerate(data.sources)
    }
    sha = _hash_inputs(plans, cache_dir)
    unit = tokenization_unit(data.chunking, data.chunk_chars)
    shards = {
        s.name: plan_shards(
            s.name,
            plans[s.name],
            sha,
            settings_for(s.text_field, dataclasses.asdict(data.filters), unit, tokinfo["fingerprint"]),
        )
        for s in data.sources
    }
    fingerprint = digest([sh.key for v in shards.values() for sh in v], _assembly_settings(data))
    if data.prune_cache:
        prune_cache(cache_dir, {name: {sh.key for sh in v} for name, v in shards.items()})
    current = _complete_manifest(out)
    if not force and current and current.get("fingerprint") == fingerprint:
        log.info("%s is up to date (same inputs, tokenizer and settings): nothing to do", out)
        return current
    timings: dict[str, float] = {}
    start = time.perf_counter()
    encoder = Encoder(tok)
    stats = _tokenize_all(shards, plans, data, encoder, cache_dir, force)
    timings["tokenize_s"] = round(time.perf_counter() - start, 3)
    _check_nonempty(data, stats)

    from cptkit.data.assemble import assemble

    start = time.perf_counter()
    tables = {name: _concat([open_shard(sh, cache_dir) for sh in shards[name]]) for name in shards}
    result = assemble(tables, data, encoder)
    _check_trainable(data, result.stats)
    timings["assemble_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    manifest = _manifest(cfg, tokinfo, plans, sha, stats, result, fingerprint, shards)
    _write(out, result, manifest, cfg)
    timings["write_s"] = round(time.perf_counter() - start, 3)
    manifest["timings"] = timings
    write_json(out / MANIFEST, manifest)  # the status "complete" lands last
    log.info(
        "prepared %s rows (%s tokens) in %s",
        f"{manifest['totals']['rows']:,}",
        f"{manifest['totals']['trained_tokens']:,}",
        out,
    )
    return manifest


def _assembly_settings(data) -> dict[str, Any]:
    """Everything after tokenization that changes the output (a change re-assembles, never re-tokenizes)."""
    keep = (
        "seq_length",
        "chunking",
        "chunk_chars",
        "chunk_tokens",
        "heldout_fraction",
        "heldout_max_documents",
        "dedup",
        "mix",
        "seed",
    )
    d = {k: getattr(data, k) for k in keep}
    d["sources"] = [(s.name, s.weight, s.role, s.heldout_fraction) for s in data.sources]
    return d | {"format_version": FORMAT_VERSION}


def _complete_manifest(out: Path) -> dict[str, Any] | None:
    from cptkit.data.manifest import read_manifest

    try:
        manifest = read_manifest(out)
    except CptkitError:
        return None
    return manifest if (out / manifest.get("train_dir", "train")).is_dir() else None


def prune_cache(cache_dir: Path, keep: dict[str, set[str]]) -> tuple[int, int]:
    """Delete cache entries that no source of this config uses (another tokenizer, filters, changed or
    removed files, removed sources); returns (entries removed, bytes freed)."""
    removed = freed = 0
    if not cache_dir.is_dir():
        return 0, 0
    for folder in (p for p in cache_dir.iterdir() if p.is_dir()):
        for entry in list(folder.iterdir()):
            key = entry.name.split(".", 1)[0]
            if folder.name in keep and key in keep[folder.name]:
                continue
            freed += entry.stat().st_size
            removed += entry.suffix == ".arrow"
            entry.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()
    log.info(
        "cache: removed %d unused entr%s, %.1f MB freed", removed, "y" if removed == 1 else "ies", freed / 1e6
    )
    return removed, freed


def _hash_inputs(plans: dict[str, readers.SourcePlan], cache_dir: Path) -> dict[Path, str]:
    """sha256 of every input file (streamed; remembered by size and mtime between runs)."""
    from tqdm.auto import tqdm

    files = [p for plan in plans.values() for p in plan.files]
    cache = HashCache(cache_dir / "file_hashes.json")
    total = sum(p.stat().st_size for p in files)
    sha = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing inputs", disable=total < 64 << 20) as bar:
        for p in files:
            sha[p] = cache.sha256(p)
            bar.update(p.stat().st_size)
    cache.save()
    return sha


def _tokenize_all(
    shards, plans, data, encoder: Encoder, cache_dir: Path, force: bool
) -> dict[str, ShardStats]:
    """Tokenize every shard not already cached; returns each source's merged stats."""
    from tqdm.auto import tqdm

    unit = tokenization_unit(data.chunking, data.chunk_chars)
    num_proc = data.num_proc or usable_cores()
    by_source = {s.name: s for s in data.sources}
    todo = [sh for v in shards.values() for sh in v if force or cached_stats(sh, cache_dir) is None]
    todo_keys = {sh.key for sh in todo}
    cached = sum(len(v) for v in shards.values()) - len(todo)
    if cached:
        log.info("reusing %d cached tokenized shard(s)%s", cached, "" if todo else ": nothing to tokenize")
    stats: dict[str, ShardStats] = {name: ShardStats() for name in shards}
    for leftover in cache_dir.glob("*/*.tmp"):  # from an interrupted run
        leftover.unlink(missing_ok=True)
    work = Tokenizing(encoder, data.filters, unit, num_proc) if todo else None
    try:
        with tqdm(
            total=sum(sh.bytes for sh in todo), unit="B", unit_scale=True, desc="tokenizing", disable=not todo
        ) as bar:
            readers.report_progress(bar.update)
            for name, source_shards in shards.items():
                for sh in source_shards:
                    s = None if sh.key in todo_keys else cached_stats(sh, cache_dir)
                    if s is None:
                        bar.set_postfix_str(name)
                        s = tokenize_shard(sh, plans[name], by_source[name].text_field, work, cache_dir)
                    _merge(stats[name], s)
    finally:
        readers.report_progress(None)
        if work is not None:
            work.close()
    return stats


def _merge(total: ShardStats, part: ShardStats) -> None:
    total.read += part.read
    total.kept += part.kept
    total.characters += part.characters
    total.tokens += part.tokens
    total.ledger.merge(part.ledger)


def _check_nonempty(data, stats: dict[str, ShardStats]) -> None:
    for i, s in enumerate(data.sources):
        st = stats[s.name]
        if st.kept == 0:
            drops = ", ".join(f"{r}: {n}" for r, n in st.ledger.drops.most_common()) or "none"
            raise CptkitError(
                f"data.sources[{i}] ({s.name}): no documents left from {s.path} ({st.read} read; dropped: {drops}); "
                f"check the path, text_field ({s.text_field!r}) and data.filters"
            )


def _check_trainable(data, stats: dict[str, dict[str, Any]]) -> None:
    """A weighted source must give training tokens, or the asked mix silently cannot be met."""
    for i, s in enumerate(data.sources):
        a = stats[s.name]
        if s.weight > 0 and a["train_tokens"] == 0:
            raise CptkitError(
                f"data.sources[{i}] ({s.name}): no training tokens left ({a['duplicates']} document(s) were "
                f"duplicates of earlier documents, {a['heldout_documents']} held out); give it weight 0 "
                "to keep it for held-out evaluation only, or set data.dedup: none"
            )


def _concat(tables):
    import pyarrow as pa

    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _manifest(cfg, tokinfo, plans, sha, stats, result, fingerprint, shards) -> dict[str, Any]:
    data = cfg.data
    sources, heldout = {}, {}
    for s in data.sources:
        st, a, held = stats[s.name], result.stats[s.name], result.heldout[s.name]
        sources[s.name] = {
            "role": s.role,
            "weight": s.weight,
            "path": s.path,
            "read": st.read,
            "documents": a["documents"],
            "characters": a["characters"],
            "tokens": a["tokens"],
            "drops": dict(st.ledger.drops),
            "repairs": dict(st.ledger.repairs),
            "ignored_files": len(plans[s.name].ignored or []),
            "examples": st.ledger.examples
            | ({"ignored_file": str(plans[s.name].ignored[0])} if plans[s.name].ignored else {}),
            "duplicates": a["duplicates"],
            "near_duplicates": a["near_duplicates"],
            "heldout_documents": a["heldout_documents"],
            "heldout_tokens": a["heldout_tokens"],
            "train_documents": a["train_documents"],
            "train_tokens": a["train_tokens"],
            "segments": a["segments"],
            "sampling_factor": a["sampling_factor"],
            "mixed_tokens": a["mixed_tokens"],
            "mixed_segments": a["mixed_segments"],
            "mixed_share": a["mixed_share"],
            "shards": len(shards[s.name]),
        }
        heldout[s.name] = {
            "dir": f"heldout/{s.name}",
            "role": s.role,
            "documents": len(held.texts),
            "tokens": a["heldout_tokens"],
            "bytes": int(sum(held.num_bytes)),
        }
    rows = result.rows
    n_rows, trained = rows.num_rows, rows.num_tokens
    capacity = n_rows * data.seq_length
    return {
        "status": "writing",
        "format_version": FORMAT_VERSION,
        "created": now(),
        "fingerprint": fingerprint,
        "seq_length": data.seq_length,
        "chunking": data.chunking,
        "train_dir": "train",
        "tokenizer": tokinfo,
        "mix": data.mix,
        "heldout": heldout,
        "sources": sources,
        "totals": {
            "rows": n_rows,
            "trained_tokens": trained,
            "padding_tokens": capacity - trained,
            "packing_efficiency": round(trained / capacity, 6) if capacity else 0.0,
        },
        "inputs": [
            {"source": name, "path": str(p), "bytes": p.stat().st_size, "sha256": sha[p]}
            for name, plan in plans.items()
            for p in plan.files
        ],
        "config": dataclasses.asdict(data),
        "versions": versions(),
    }


def _write(out: Path, result, manifest: dict[str, Any], cfg: Config) -> None:
    """Write train/ and heldout/ into a temporary folder, then move them in place; the manifest goes last."""
    from cptkit.data.write import write_heldout, write_train

    log.info(
        "writing %s rows and %d held-out set(s) to %s",
        f"{result.rows.num_rows:,}",
        len(result.heldout),
        out,
    )

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".writing-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f".writing-{os.getpid()}"
    write_train(result.rows, tmp / "train")
    for name, held in result.heldout.items():
        write_heldout(held, tmp / "heldout" / name)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder reads as incomplete
    for part in ("train", "heldout"):
        if (out / part).exists():
            shutil.rmtree(out / part)
        (tmp / part).rename(out / part)
    shutil.rmtree(tmp, ignore_errors=True)
    write_config(out, cfg)
    manifest["status"] = "complete"

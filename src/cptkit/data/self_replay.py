"""Self-replay sources (`type: self_replay`): general text the base model writes itself from neutral
prompts before training, for when its pretraining data is not available (the usual case). Held-out
perplexity on it measures drift from the model's own distribution, which is what forgetting looks
like from the inside; training on a share of it pulls the model back towards that distribution.

The documents are written once into the token store (`<out>/store/<source>/self_replay-<key>.jsonl`,
with a `.json` record beside it), keyed by the model's weights (config and weight files' sizes and
modification times), the prompts' text and every sampling setting: a second prepare reuses them without
loading the model, a changed setting writes them again. From there they are an ordinary input file of
the source: normalised, filtered, deduplicated, split and mixed like any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from cptkit.config.data import DataConfig, SelfReplayConfig, SourceConfig
from cptkit.data.hashing import digest
from cptkit.errors import CptkitError
from cptkit.outputs import temporary_beside, write_json

log = logging.getLogger(__name__)

PROMPTS_FILE = "self_replay_prompts.txt"  # in cptkit's presets folder
PREFIX = "self_replay-"  # of the store entries, beside the source's tokenized shards
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def shipped_prompts() -> Path:
    """The neutral prompts cptkit ships (everyday topics, no domain)."""
    from cptkit import presets

    return presets.folder() / PROMPTS_FILE


def read_prompts(path: str | Path | None, where: str = "self_replay.prompts") -> list[str]:
    """The prompts of a text file, one a line (empty lines ignored); the shipped set when `path` is None."""
    file = Path(path) if path is not None else shipped_prompts()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CptkitError(
            f"{where}: {file} cannot be read ({e.strerror}); give a text file, one prompt a line"
        ) from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise CptkitError(f"{where}: {file} holds no prompt; write one prompt a line")
    return prompts


def with_default_model(data: DataConfig, default_model: str | None) -> DataConfig:
    """`data` with each self-replay source's model set (its own, else `default_model`, the base model's
    model.name_or_path), so that the prepare record and the cache name the model that wrote the text."""
    sources = [
        dataclasses.replace(s, self_replay=dataclasses.replace(s.self_replay, model=default_model))
        if s.type == "self_replay" and s.self_replay.model is None
        else s
        for s in data.sources
    ]
    return dataclasses.replace(data, sources=sources)


def source_inputs(source: SourceConfig, default_model: str | None) -> list[str]:
    """What a source reads, for the stamps of `cptkit run`: its path (a hub source's dataset folder or
    name), or the model and prompts file."""
    if source.type == "hub":
        return [source.hub.path]
    if source.type != "self_replay":
        return [source.path]
    spec = source.self_replay
    return [p for p in (spec.model or default_model, spec.prompts or str(shipped_prompts())) if p]


def model_fingerprint(name_or_path: str) -> dict[str, Any]:
    """What identifies a model's weights cheaply: a local folder's config.json content and its weight
    files' names, sizes and modification times; a hub name stands for itself."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return {"name": name_or_path}
    config = folder / "config.json"
    weights = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name.endswith(".index.json"))
    )
    return {
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights],
    }


def _settings(spec: SelfReplayConfig) -> dict[str, Any]:
    keys = (
        "documents",
        "max_tokens",
        "max_new_tokens",
        "temperature",
        "top_p",
        "batch_size",
        "seed",
        "engine",
    )
    return {k: getattr(spec, k) for k in keys}


def generated_inputs(data: DataConfig, cache_dir: Path) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Each source's path (a self_replay source's generated file, written now unless cached) and the
    records of the self_replay sources, by source name."""
    paths, records = {}, {}
    for i, s in enumerate(data.sources):
        if s.type == "self_replay":
            file, records[s.name] = materialize(s, f"data.sources[{i}]", cache_dir, data.trust_remote_code)
            paths[s.name] = str(file)
        else:
            paths[s.name] = s.path
    return paths, records


def materialize(
    source: SourceConfig, where: str, cache_dir: Path, trust_remote_code: bool = False
) -> tuple[Path, dict[str, Any]]:
    """The source's generated documents as a JSONL file in the cache (written now unless a file of the
    same model, prompts and settings is there) and the record of how they were written (the manifest's
    `self_replay` entry). `where` names the source in messages, e.g. `data.sources[1]`."""
    spec = source.self_replay
    if spec.model is None:
        raise CptkitError(
            f"{where}.self_replay.model: not set, and no model.name_or_path to default to; name the model "
            "that writes the text"
        )
    prompts = read_prompts(spec.prompts, f"{where}.self_replay.prompts")
    key = digest(model_fingerprint(spec.model), prompts, _settings(spec), source.text_field)
    folder = cache_dir / source.name
    documents, record_file = folder / f"{PREFIX}{key}.jsonl", folder / f"{PREFIX}{key}.json"
    if documents.is_file() and record_file.is_file():
        log.info("%s (%s): reusing %s documents the model wrote before", where, source.name, documents.name)
        return documents, json.loads(record_file.read_text(encoding="utf-8"))
    texts, record = write_documents(spec, prompts, f"{where}.self_replay", trust_remote_code)
    record |= {"key": key, "file": str(documents), "prompts": spec.prompts or "shipped"}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(documents)
    tmp.write_text(
        "".join(json.dumps({source.text_field: t}, ensure_ascii=False) + "\n" for t in texts),
        encoding="utf-8",
    )
    tmp.replace(documents)
    write_json(record_file, record)  # last, atomically: marks it complete
    return documents, record


def write_documents(
    spec: SelfReplayConfig, prompts: list[str], where: str, trust_remote_code: bool = False
) -> tuple[list[str], dict[str, Any]]:
    """`spec.documents` documents (prompt and continuation), prompts taken in turn, stopping early once
    `spec.max_tokens` new tokens are written; and how they were written."""
    from cptkit.generate import Sampling, pick_engine

    engine = pick_engine(spec.engine, f"{where}.engine")
    wanted = [prompts[i % len(prompts)] for i in range(spec.documents)]
    sampling = Sampling(spec.max_new_tokens, spec.temperature, spec.top_p, spec.seed)
    log.info(
        "%s: %s writes %d documents of up to %d new tokens with %s (cached after)",
        where,
        spec.model,
        len(wanted),
        spec.max_new_tokens,
        engine,
    )
    start = time.perf_counter()
    if engine == "vllm":
        from cptkit.generate import generate_with_vllm

        generated = generate_with_vllm(spec.model, wanted, sampling, trust_remote_code)
    else:
        generated = _generate_here(spec, wanted, sampling, trust_remote_code)
    if spec.max_tokens is not None:
        generated = _within_budget(generated, spec.max_tokens)
    record = {
        "model": spec.model,
        **_settings(spec),
        "engine_used": engine,
        "documents_written": len(generated),
        "tokens_written": sum(g.new_tokens for g in generated),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return [g.document.strip() for g in generated], record


def _generate_here(
    spec: SelfReplayConfig, prompts: list[str], sampling: Any, trust_remote_code: bool
) -> list[Any]:
    """transformers' generate: `batch_size` prompts at a time on a GPU, all at once on a CPU; batches
    stop once the token budget is spent."""
    from cptkit.eval.models import load_model, load_tokenizer, pick_device, pick_dtype
    from cptkit.generate import iter_generate

    device = pick_device("auto")
    model = load_model(spec.model, device, pick_dtype(device), trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(spec.model, trust_remote_code=trust_remote_code)
    batch_size = spec.batch_size if device.type == "cuda" else len(prompts)
    out: list[Any] = []
    for batch in iter_generate(model, tokenizer, prompts, sampling, batch_size):
        out += batch
        if spec.max_tokens is not None and sum(g.new_tokens for g in out) >= spec.max_tokens:
            break
    return out


def _within_budget(generated: list[Any], max_tokens: int) -> list[Any]:
    """The first documents until `max_tokens` new tokens are reached (the one that reaches it kept)."""
    kept, total = [], 0
    for g in generated:
        if total >= max_tokens:
            break
        kept.append(g)
        total += g.new_tokens
    return kept

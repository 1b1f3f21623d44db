"""What one `cptkit prepare` will read and how, worked out before any work: each source's files (or hub
dataset's stream), their content hashes, the shards they are tokenized in (and stored under), and the
fingerprint of everything that decides the output (a rerun with the same fingerprint has nothing to do)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cptkit.config.data import DataConfig, SourceConfig
from cptkit.data.cache import FILE_HASHES, STORE_DIR
from cptkit.data.caps import Cap
from cptkit.data.chunk import Chunker
from cptkit.data.extension import Extended, extension_for
from cptkit.data.hashing import digest, hash_files
from cptkit.data.hub import plan_hub
from cptkit.data.manifest import FORMAT_VERSION
from cptkit.data.readers import SourcePlan, plan_source
from cptkit.data.self_replay import PREFIX, generated_inputs
from cptkit.data.shards import Shard, ShardTask, plan_shards, settings_for
from cptkit.data.tokenize import describe, load_tokenizer
from cptkit.data.vocabulary_file import TOKENIZER_DIR
from cptkit.data.workers import PoolKind, usable_cores

# Everything after tokenization that changes the output (a change re-assembles, never re-tokenizes).
_ASSEMBLY_KEYS = (
    "seq_length",
    "chunking",
    "chunk_chars",
    "chunk_tokens",
    "heldout_fraction",
    "heldout_max_documents",
    "heldout_min_documents",
    "heldout_min_tokens",
    "dedup",
    "near_dedup_threshold",
    "mix",
    "seed",
    "pack_window",
)


@dataclass
class Plan:
    """The inputs and shards of one preparation into `out`."""

    data: DataConfig
    out: Path
    tokenizer: Any  # the loaded HF tokenizer
    tokenizer_info: dict[str, Any]  # the manifest's `tokenizer` entry
    sources: dict[str, SourcePlan]
    sha256: dict[Path, str | None]  # None: a file that could not be read (counted when read)
    shards: dict[str, list[Shard]]
    chunker: Chunker
    fingerprint: str
    generated: dict[str, dict[str, Any]] = field(default_factory=dict)  # self-replay sources' records
    extended: Extended | None = None  # data.vocabulary's extension: `tokenizer` is its tokenizer

    @property
    def cache_dir(self) -> Path:
        """The token store, `<out>/store`."""
        return self.out / STORE_DIR

    def shard_keys(self) -> dict[str, set[str]]:
        keys = {name: {sh.key for sh in shards} for name, shards in self.shards.items()}
        for name, record in self.generated.items():  # the generated documents are store entries too
            keys[name].add(PREFIX + record["key"])
        return keys

    def tasks(self, pool: PoolKind | None = None) -> list[ShardTask]:
        """One task per shard, sources in config order."""
        num_proc = self.data.num_proc or usable_cores()
        return [
            ShardTask(
                shard=sh,
                plan=self.sources[s.name],
                text_field=s.text_field,
                filters=self.data.filters,
                chunker=self.chunker,
                tokenizer=self.tokenizer,
                cache_dir=self.cache_dir,
                fingerprint=self.tokenizer_info["fingerprint"],
                num_proc=num_proc,
                pool=pool,
                cap=Cap.of(s),
            )
            for s in self.data.sources
            for sh in self.shards[s.name]
        ]


def make_plan(data: DataConfig, out: Path) -> Plan:
    """List and hash the inputs, load the tokenizer, key the shards; raises CptkitError when a source
    has nothing to read or the tokenizer cannot be loaded. With `data.vocabulary.extend`, the extension
    is learnt here (or reused from `out`) and the plan tokenizes with the extended tokenizer."""
    tok = load_tokenizer(data.tokenizer, data.trust_remote_code)
    paths, generated = generated_inputs(data, out / STORE_DIR)  # a self_replay source's path is written here
    sources = {
        s.name: _plan_source(s, paths[s.name], f"data.sources[{i}]") for i, s in enumerate(data.sources)
    }
    sha = hash_files([p for plan in sources.values() for p in plan.files], out / STORE_DIR / FILE_HASHES)
    extended = extension_for(data, out, tok, sources, sha) if data.vocabulary.extend > 0 else None
    if extended is None:
        info = describe(tok, data.tokenizer)
    else:
        tok = extended.tokenizer
        info = describe(tok, str(out / TOKENIZER_DIR)) | {"base": extended.base_info}
    chunker = Chunker.from_config(data)
    filters = dataclasses.asdict(data.filters)
    shards = {
        s.name: plan_shards(
            s.name,
            sources[s.name],
            sha,
            settings_for(s.text_field, filters, chunker.unit, info["fingerprint"]) | _cap_setting(s),
        )
        for s in data.sources
    }
    fingerprint = digest([sh.key for v in shards.values() for sh in v], _assembly_settings(data))
    return Plan(data, out, tok, info, sources, sha, shards, chunker, fingerprint, generated, extended)


def _plan_source(source: SourceConfig, path: str | None, where: str) -> SourcePlan:
    label = f"{where} ({source.name})"
    if source.type == "hub":
        return plan_hub(source.hub, source.text_field, where)
    return plan_source(path, source.text_field, label)


def _cap_setting(source: SourceConfig) -> dict[str, Any]:
    """A capped source's shards hold only the documents up to its cap: the caps are part of their key
    (an uncapped source's keys are what they were before caps existed)."""
    cap = Cap.of(source)
    return {} if cap is None else {"cap": [cap.max_documents, cap.max_tokens]}


def _assembly_settings(data: DataConfig) -> dict[str, Any]:
    d = {k: getattr(data, k) for k in _ASSEMBLY_KEYS}
    d["sources"] = [
        (s.name, s.weight, s.role, s.heldout_fraction, s.heldout_min_documents, s.heldout_min_tokens)
        + ((s.max_documents, s.max_tokens) if Cap.of(s) is not None else ())
        for s in data.sources
    ]
    return d | {"format_version": FORMAT_VERSION}

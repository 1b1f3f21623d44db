"""The prepared dataset's contract: its folder layout, its manifest, and the tokenizer it was made with.

Layout of a folder written by `cptkit prepare`:
    manifest.json            counts, inputs, tokenizer, resolved config, source_index (source -> id),
                             heldout_floor (source -> min_documents, min_tokens, met), each source's
                             fertility (tokens_per_1k_chars, tokens_per_word, tokens_per_char, unit)
    config.yaml              the resolved config
    store/<source>/<key>.arrow  the token store: one Arrow IPC file per shard of input files (hash,
                             where, num_chars, num_bytes, text, input_ids, starts per document; schema
                             metadata cptkit_store_format and tokenizer_fingerprint), finished when its
                             stats file <key>.json exists
    train/index.json         the training rows as an index into the store (format 3): rows, segments,
                             tokens, seq_length, tokenizer_fingerprint, the store files of the token space
                             (`shards`: path, tokens, documents) and the arrays beside it (`arrays`)
    train/<array>.bin        raw little-endian arrays: row_offsets (rows + 1: each row's first segment),
                             segment_starts (each segment's first token in the token space: the listed
                             store files' input_ids values end to end), segment_lengths, segment_sources
                             (each segment's `source_index` id). Row r is segments row_offsets[r] to
                             row_offsets[r + 1] end to end: at most seq_length tokens, unpadded,
                             position_ids restarting at 0 at every segment, one source id per segment
    heldout/<source>/        datasets.save_to_disk: text, input_ids (whole document, BOS as the tokenizer
                             adds it, EOS at the end), num_bytes (UTF-8 bytes of text)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cptkit.data.fertility import fertility
from cptkit.data.hashing import file_size
from cptkit.errors import CptkitError
from cptkit.paths import MANIFEST

if TYPE_CHECKING:
    from cptkit.data.assemble import Assembled
    from cptkit.data.plan import Plan
    from cptkit.data.shards import ShardStats
    from cptkit.data.write import WrittenRows

# 2: training rows carry source_ids and the manifest a top-level source_index
# 3: train/ is an index into the token store (store/), not a copy of the tokens; totals.pack_windows
FORMAT_VERSION = 3
TRAIN_DIR = "train"
HELDOUT_DIR = "heldout"
TRAIN_INDEX = "index.json"  # inside train/
TRAIN_FORMAT = 3  # train/index.json's `format`
# the raw arrays of train/ (name -> little-endian dtype), each in train/<name>.bin
TRAIN_ARRAYS = {
    "row_offsets": "<i8",
    "segment_starts": "<i8",
    "segment_lengths": "<i4",
    "segment_sources": "<i4",
}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash that changes whenever the tokenizer would produce different ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation and padding are call settings (a saved tokenizer.json may carry them, and prepare
        # turns them off): they do not change the id of any token
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:  # slow tokenizers: the vocabulary is what matters
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    # BOS and EOS go into the stored ids; padding is added later, by the collator, and never trained on
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id")}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()[:16]


def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """Load a prepared folder's manifest, or say plainly why this is not a prepared folder."""
    folder = Path(prepared_dir)
    path = folder / MANIFEST
    if not folder.exists():
        raise CptkitError(f"{folder}: no such folder; run `cptkit prepare CONFIG.yaml` first")
    if not path.is_file():
        raise CptkitError(
            f"{folder}: not a dataset made by `cptkit prepare` (no {MANIFEST}); run `cptkit prepare CONFIG.yaml`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CptkitError(f"{path}: unreadable ({e}); run `cptkit prepare` again") from None
    if manifest.get("status") != "complete":
        raise CptkitError(f"{folder}: preparation did not finish; rerun `cptkit prepare` to resume it")
    return manifest


def build_manifest(
    plan: Plan, read: dict[str, ShardStats], result: Assembled, written: WrittenRows
) -> dict[str, Any]:
    """The manifest of a preparation (status "writing" until its folder is in place): what each source
    gave (`read`: what reading and filtering found; `result`: dedup, split and mix), the held-out sets,
    the training rows' totals (`written`: what packing them into train/ gave), and the inputs with their
    hashes."""
    from cptkit.outputs import now, versions

    data = plan.data
    capacity = written.rows * data.seq_length
    return {
        "status": "writing",
        "format_version": FORMAT_VERSION,
        "created": now(),
        "fingerprint": plan.fingerprint,
        "seq_length": data.seq_length,
        "chunking": data.chunking,
        "train_dir": TRAIN_DIR,
        "tokenizer": plan.tokenizer_info,
        "mix": data.mix,
        "source_index": dict(result.source_index),
        "heldout": {s.name: _heldout_entry(s, result) for s in data.sources},
        "heldout_floor": dict(result.floors),
        "sources": {s.name: _source_entry(s, plan, read[s.name], result.stats[s.name]) for s in data.sources},
        "totals": {
            "rows": written.rows,
            "trained_tokens": written.tokens,
            "padding_tokens": capacity - written.tokens,
            "packing_efficiency": round(written.tokens / capacity, 6) if capacity else 0.0,
            "pack_windows": written.windows,
        },
        "inputs": [entry for name, source in plan.sources.items() for entry in _inputs(name, source, plan)],
        "config": dataclasses.asdict(data),
        "versions": versions(),
        **({"vocabulary": plan.extended.summary()} if plan.extended is not None else {}),
    }


def _inputs(name: str, source: Any, plan: Plan) -> list[dict[str, Any]]:
    """The files a source read, with their sizes and content hashes; a hub source's data files also
    name the dataset (path, configuration, split, revision and the commit read), and their sizes and
    hashes are the hub's where the files are remote (null where not known: offline)."""
    hub = source.hub
    if hub is None:
        return [
            {"source": name, "path": str(p), "bytes": file_size(p), "sha256": plan.sha256[p]}
            for p in source.files
        ]
    record = hub.describe()
    if not hub.files:  # the builder does not list its files: the dataset itself is the input
        return [{"source": name, "path": hub.path, "bytes": None, "sha256": None, "hub": record}]
    return [
        {
            "source": name,
            "path": f,
            "bytes": hub.sizes.get(f),
            "sha256": plan.sha256.get(Path(f)) if hub.local else hub.hub_sha256.get(f),
            "hub": record,
        }
        for f in hub.files
    ]


_ASSEMBLED = (
    "capped_documents",
    "capped_tokens",
    "duplicates",
    "near_duplicates",
    "heldout_documents",
    "heldout_tokens",
    "train_documents",
    "train_tokens",
    "segments",
    "sampling_factor",
    "mixed_tokens",
    "mixed_segments",
    "mixed_share",
)


def _source_entry(source: Any, plan: Plan, read: ShardStats, assembled: dict[str, Any]) -> dict[str, Any]:
    ignored = plan.sources[source.name].ignored or []
    return {
        "role": source.role,
        "weight": source.weight,
        "path": source.path,
        "read": read.read,
        "documents": assembled["documents"],
        "characters": assembled["characters"],
        "tokens": assembled["tokens"],
        # what the tokenizer costs on the source's kept text, before dedup and the held-out split
        "fertility": fertility(read.characters, read.tokens, read.words, read.spaceless, read.sampled),
        "drops": dict(read.ledger.drops),
        "repairs": dict(read.ledger.repairs),
        "ignored_files": len(ignored),
        "examples": read.ledger.examples | ({"ignored_file": str(ignored[0])} if ignored else {}),
        **{k: assembled[k] for k in _ASSEMBLED},
        "shards": len(plan.shards[source.name]),
        **({"self_replay": plan.generated[source.name]} if source.name in plan.generated else {}),
    }


def _heldout_entry(source: Any, result: Assembled) -> dict[str, Any]:
    held = result.heldout[source.name]
    return {
        "dir": f"{HELDOUT_DIR}/{source.name}",
        "role": source.role,
        "documents": len(held.texts),
        "tokens": result.stats[source.name]["heldout_tokens"],
        "bytes": int(sum(held.num_bytes)),
    }

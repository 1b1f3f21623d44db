"""Prepared folders of format 3 written by hand, as docs/CONTRACTS.md lays them out: store files, the
`train/` index and a manifest. Tests check the reading side against them without running prepare, and
benches build large synthetic folders in seconds.

The rows are the documents cut into pieces of at most `seq_length` tokens, packed best-fit and shuffled
by `seed`; `write_prepared` returns them as segments, so a test can build each row from the documents
themselves and compare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class Segment:
    """Tokens `offset .. offset + length` of document `document` of source `source`."""

    source: str
    document: int
    offset: int
    length: int


def write_store_file(
    path: Path,
    documents: list[np.ndarray],
    fingerprint: str,
    batch_documents: int = 64,
    store_format: str = "2",
) -> dict[str, Any]:
    """One store file of `documents` (int32 id arrays), `batch_documents` to a record batch; returns its
    index entry (`path` left to the caller)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    from cptkit.data.shards import SCHEMA

    schema = SCHEMA.with_metadata(
        {b"cptkit_store_format": store_format.encode(), b"tokenizer_fingerprint": fingerprint.encode()}
    )
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for at in range(0, len(documents), batch_documents):
            docs = documents[at : at + batch_documents]
            n = len(docs)
            offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int32)
            values = np.concatenate(docs).astype(np.int32) if n else np.empty(0, np.int32)
            columns = [
                pa.array([bytes(16)] * n, pa.binary(16)),
                pa.array([f"doc {at + k}" for k in range(n)], pa.string()),
                pa.array([len(d) for d in docs], pa.int64()),
                pa.array([len(d) for d in docs], pa.int64()),
                pa.array([""] * n, pa.large_string()),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                pa.nulls(n, pa.list_(pa.int32())),
            ]
            writer.write_batch(pa.record_batch(columns, schema=schema))
    return {"tokens": int(sum(len(d) for d in documents)), "documents": len(documents)}


def pack_rows(sources: dict[str, list[np.ndarray]], seq_length: int, seed: int = 0) -> list[list[Segment]]:
    """The documents in pieces of at most `seq_length`, packed best-fit, the rows shuffled by `seed`."""
    from cptkit.data.pack import best_fit_pack

    segments = [
        Segment(name, d, at, min(seq_length, len(doc) - at))
        for name, docs in sources.items()
        for d, doc in enumerate(docs)
        for at in range(0, len(doc), seq_length)
    ]
    rows = best_fit_pack([s.length for s in segments], seq_length)
    order = np.random.default_rng(seed).permutation(len(rows))
    return [[segments[i] for i in rows[r]] for r in order]


def write_prepared(
    folder: Path,
    sources: dict[str, list[np.ndarray]],
    seq_length: int,
    tokenizer: dict[str, Any],
    seed: int = 0,
    batch_documents: int = 64,
    shards_per_source: int = 1,
    roles: dict[str, str] | None = None,
) -> list[list[Segment]]:
    """A prepared folder of format 3 in `folder` holding `sources` (name -> documents, int32 id arrays)
    in `shards_per_source` store files each; `tokenizer` is the manifest's tokenizer entry (its
    `fingerprint` goes into every store file and the index), `roles` the sources' roles (default
    domain). Returns the rows (`pack_rows(sources, seq_length, seed)`), as segments."""
    from cptkit.data.store import ARRAYS, INDEX, TRAIN_FORMAT

    folder = Path(folder)
    sources = {name: [np.asarray(d, np.int32) for d in docs] for name, docs in sources.items()}
    fingerprint = tokenizer["fingerprint"]
    shards, where = [], {}  # where: (source, document) -> offset of its first token in the token space
    space = 0
    for name, docs in sources.items():
        per_shard = -(-len(docs) // shards_per_source) or 1
        for k, at in enumerate(range(0, max(len(docs), 1), per_shard)):
            rel = f"store/{name}/shard{k:03d}.arrow"
            part = docs[at : at + per_shard]
            shards.append({"path": rel, **write_store_file(folder / rel, part, fingerprint, batch_documents)})
            for d, doc in enumerate(part, start=at):
                where[(name, d)] = space
                space += len(doc)
    rows = pack_rows(sources, seq_length, seed)
    source_index = {name: i for i, name in enumerate(sources)}
    flat = [s for row in rows for s in row]
    arrays = {
        "row_offsets": np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype("<i8"),
        "segment_starts": np.asarray([where[(s.source, s.document)] + s.offset for s in flat], "<i8"),
        "segment_lengths": np.asarray([s.length for s in flat], "<i4"),
        "segment_sources": np.asarray([source_index[s.source] for s in flat], "<i4"),
    }
    train = folder / "train"
    train.mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        arrays[name].tofile(train / f"{name}.bin")
    tokens = int(arrays["segment_lengths"].sum())
    index = {
        "format": TRAIN_FORMAT,
        "rows": len(rows),
        "segments": len(flat),
        "tokens": tokens,
        "seq_length": seq_length,
        "tokenizer_fingerprint": fingerprint,
        "shards": shards,
        "arrays": {name: arrays[name].dtype.str for name in ARRAYS},
    }
    (train / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
    roles = roles or {}
    mixed = {name: sum(s.length for s in flat if s.source == name) for name in sources}
    manifest = {
        "status": "complete",
        "format_version": TRAIN_FORMAT,
        "seq_length": seq_length,
        "chunking": "packing",
        "train_dir": "train",
        "tokenizer": tokenizer,
        "source_index": source_index,
        "heldout": {},
        "sources": {
            name: {
                "role": roles.get(name, "domain"),
                "weight": 1.0,
                "documents": len(docs),
                "tokens": int(sum(len(d) for d in docs)),
                "train_tokens": mixed[name],
                "mixed_tokens": mixed[name],
            }
            for name, docs in sources.items()
        },
        "totals": {
            "rows": len(rows),
            "trained_tokens": tokens,
            "padding_tokens": len(rows) * seq_length - tokens,
            "packing_efficiency": round(tokens / max(len(rows) * seq_length, 1), 6),
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return rows


def tokenizer_entry(tokenizer: Any, name: str = "tiny") -> dict[str, Any]:
    """The manifest's tokenizer entry of a loaded HF tokenizer."""
    from cptkit.data.manifest import tokenizer_fingerprint

    return {
        "name_or_path": name,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }

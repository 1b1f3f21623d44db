"""The prepared rows are pinned: `cptkit prepare` on real text (slices of the shared corpora, committed in
tests/assets/golden) with a fixed tokenizer must give, byte for byte, the rows, held-out sets and counts
recorded in tests/assets/golden/hashes.json. A refactor that changes no behaviour keeps them; a change
that means to alter the output updates the file on purpose (`CPTKIT_GOLDEN_UPDATE=1 pytest ...`).

The slow variant runs the same check on the whole shared corpora when they are on the machine."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from cptkit.commands import prepare
from cptkit.config import Config, load_config
from cptkit.testing.prepared import read_rows

ASSETS = Path(__file__).parents[1] / "assets" / "golden"
HASHES = ASSETS / "hashes.json"
SHARED = Path(__file__).parents[3] / "shared" / "corpora"

# name -> settings on top of the base config; together they cover every chunking, both dedups, both
# mixes, a held-out-only source and a per-source held-out fraction
VARIANTS: dict[str, list[str]] = {
    "packing": [],
    "tokens": ["data.chunking=tokens", "data.chunk_tokens=96"],
    "sentences": ["data.chunking=sentences", "data.chunk_tokens=80"],
    "chars": ["data.chunking=chars", "data.chunk_chars=512"],
    "near_upsample": ["data.dedup=near", "data.mix=upsample", "data.seq_length=200"],
}


def _config(corpus: Path, out: Path, overrides: list[str]) -> Config:
    sources = [
        {"name": "sqlite", "path": str(corpus / "sqlite_docs.jsonl.gz"), "weight": 0.4},
        {"name": "postgres", "path": str(corpus / "postgresql15_docs.jsonl.gz"), "weight": 0.3},
        {"name": "bible", "path": str(corpus / "kjv_bible.jsonl.gz"), "weight": 0.3, "role": "general"},
        {"name": "austen", "path": str(corpus / "austen.jsonl.gz"), "weight": 0, "role": "general"},
    ]
    raw = {
        "run_dir": str(out),
        "data": {
            "tokenizer": str(ASSETS / "tokenizer"),
            "seq_length": 256,
            "heldout_fraction": 0.1,
            "num_proc": 2,
            "seed": 7,
            "sources": sources,
        },
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return load_config(Config, str(path), overrides)


# manifest entries that format 3 added; the recorded outputs predate them (and they are checked apart)
_NEW_SOURCE_KEYS = {"capped_documents", "capped_tokens"}
_NEW_SOURCE_ENTRIES = {"fertility"}  # per source, added later still (checked in test_fertility.py)
_NEW_TOTALS = {"pack_windows"}


def _digest(prepared: Path) -> dict[str, object]:
    """sha256 of the train rows (read from train/ by the contract alone: `cptkit.testing.prepared`) and
    of each held-out set, and the manifest's counts."""
    from datasets import load_from_disk

    manifest = json.loads((prepared / "manifest.json").read_text(encoding="utf-8"))
    out: dict[str, object] = {}
    h = hashlib.sha256()
    for input_ids, position_ids, _ in read_rows(prepared):
        h.update(input_ids.astype("<i4").tobytes() + b"|" + position_ids.astype("<i4").tobytes())
    out["train"] = h.hexdigest()
    for name in sorted(manifest["heldout"]):
        held = load_from_disk(str(prepared / manifest["heldout"][name]["dir"]))
        h = hashlib.sha256()
        for row in held:
            h.update(json.dumps([row["text"], list(row["input_ids"]), row["num_bytes"]]).encode())
        out[f"heldout/{name}"] = h.hexdigest()
    drop = {"path", "examples"} | _NEW_SOURCE_KEYS | _NEW_SOURCE_ENTRIES  # paths: of this machine
    assert all(s[k] == 0 for s in manifest["sources"].values() for k in _NEW_SOURCE_KEYS)  # no caps
    out["sources"] = {
        n: {k: v for k, v in s.items() if k not in drop} for n, s in manifest["sources"].items()
    }
    out["heldout"] = manifest["heldout"]
    assert manifest["totals"]["pack_windows"] == 1  # the corpora fit one window: today's packing
    out["totals"] = {k: v for k, v in manifest["totals"].items() if k not in _NEW_TOTALS}
    return out


def _check_source_ids(prepared: Path) -> None:
    """Each row has one source id per segment (per position_ids restart), and the tokens they name add
    up to each source's mixed_tokens in the manifest."""
    manifest = json.loads((prepared / "manifest.json").read_text(encoding="utf-8"))
    names = {i: name for name, i in manifest["source_index"].items()}
    assert list(names.values()) == list(manifest["sources"])  # every source, in config order
    tokens = dict.fromkeys(manifest["sources"], 0)
    for _, position_ids, source_ids in read_rows(prepared):
        starts = (position_ids == 0).nonzero()[0].tolist() + [len(position_ids)]
        assert len(source_ids) == len(starts) - 1
        for a, b, source in zip(starts, starts[1:], source_ids.tolist(), strict=False):
            tokens[names[source]] += b - a
    assert tokens == {n: s["mixed_tokens"] for n, s in manifest["sources"].items()}


def _check(name: str, got: dict[str, object]) -> None:
    recorded = json.loads(HASHES.read_text(encoding="utf-8")) if HASHES.is_file() else {}
    if os.environ.get("CPTKIT_GOLDEN_UPDATE"):
        recorded[name] = got
        HASHES.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return
    assert name in recorded, f"no recorded output for {name}: run with CPTKIT_GOLDEN_UPDATE=1"
    want = recorded[name]
    for key in sorted(set(want) | set(got)):
        assert got.get(key) == want.get(key), f"{name}: {key} differs from the recorded output"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prepared_output_is_pinned(tmp_path, variant):
    cfg = _config(ASSETS / "corpus", tmp_path / "run", VARIANTS[variant])
    prepare.run(cfg)
    _check(variant, _digest(tmp_path / "run" / "data"))
    _check_source_ids(tmp_path / "run" / "data")


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared corpora are not on this machine")
def test_prepared_output_is_pinned_on_the_shared_corpora(tmp_path):
    cfg = _config(SHARED, tmp_path / "run", ["data.seq_length=1024"])
    prepare.run(cfg)
    _check("shared_corpora", _digest(tmp_path / "run" / "data"))
    _check_source_ids(tmp_path / "run" / "data")

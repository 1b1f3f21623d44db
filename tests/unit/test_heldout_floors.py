"""Held-out sets that can carry a verdict: the split holds out at least a floor of documents and tokens
per source (more than the fraction where needed), within the cap and never more than a fifth of a source
that trains; a floor it cannot meet is a warning and is written in the manifest."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from rich.console import Console

from cptkit.commands import prepare
from cptkit.config import Config, build_config
from cptkit.data.split import Floor, heldout_mask
from cptkit.data.summary import heldout_table
from cptkit.errors import ConfigError
from cptkit.testing.tiny import sample_texts

HASHES = [i.to_bytes(16, "little") for i in range(100)]


def held(fraction=0.02, lengths=10, n=100, max_documents=None, train_needed=True, **floor) -> np.ndarray:
    """The split of `n` documents of `lengths` tokens each (or one length per document)."""
    lengths = np.full(n, lengths) if np.isscalar(lengths) else np.asarray(lengths)
    return heldout_mask(HASHES[:n], fraction, max_documents, 3, train_needed, lengths, Floor(**floor))


def test_the_floor_raises_a_fraction_that_holds_out_too_few_and_keeps_its_documents():
    by_fraction = held()
    assert by_fraction.sum() == 2  # 2% of 100
    with_floor = held(documents=20)
    assert with_floor.sum() == 20 and with_floor[by_fraction].all()  # the same order: a superset
    assert held(fraction=0.5, documents=20).sum() == held(fraction=0.5).sum() > 20  # a floor, not a target


def test_the_token_floor_adds_documents_until_it_is_reached():
    assert held(lengths=100, tokens=200).sum() == 2  # the fraction's 2 documents already hold 200
    lengths = np.arange(1, 101) * 10
    mask = held(lengths=lengths, tokens=5_000)
    taken = lengths[mask].sum()
    assert taken >= 5_000 and taken - lengths[mask].max() < 5_000  # not a document more than needed
    assert held(lengths=lengths, tokens=5_000, documents=12).sum() == max(12, mask.sum())


def test_the_floor_is_capped_and_never_takes_more_than_a_fifth_of_a_source_that_trains():
    assert held(documents=20, max_documents=5).sum() == 5
    assert held(n=30, documents=20).sum() == 6  # a fifth of 30 documents
    assert held(n=30, tokens=10_000).sum() == 6  # the token floor likewise
    counts = []
    for giant in range(30):  # one document holding most of the tokens, at every place in the split order
        lengths = np.full(30, 10)
        lengths[giant] = 100_000
        mask = held(n=30, lengths=lengths, documents=20)
        # the floor stops short of it; only the one document every split holds out may be it
        assert lengths[mask].sum() <= lengths.sum() / 5 or mask.sum() == 1
        counts.append(int(mask.sum()))
    assert min(counts) < 6 and max(counts) == 6


def test_a_held_out_only_source_gives_everything_and_a_fraction_of_zero_holds_nothing_out():
    assert held(fraction=1.0, n=8, train_needed=False, documents=20).sum() == 8
    assert held(fraction=1.0, n=8, train_needed=False, documents=20, max_documents=3).sum() == 3
    assert held(fraction=0.0, documents=20, tokens=10).sum() == 0  # no held-out set asked for


def write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def sources(tmp_path):
    texts = sample_texts()
    return [
        {"name": "dom", "path": write(tmp_path / "dom.jsonl", texts[:60])},
        {"name": "gen", "path": write(tmp_path / "gen.jsonl", texts[60:70]), "role": "general"},
        {
            "name": "held",
            "path": write(tmp_path / "held.jsonl", texts[70:75]),
            "weight": 0,
            "role": "general",
        },
        {"name": "off", "path": write(tmp_path / "off.jsonl", texts[75:95]), "heldout_fraction": 0},
    ]


def test_prepare_meets_the_floor_or_says_why_in_a_warning_and_the_manifest(
    tmp_path, tiny_tokenizer_dir, caplog
):
    srcs = sources(tmp_path)
    srcs[0]["heldout_min_documents"] = 8  # a source's own floor wins over data.heldout_min_documents
    data = {"tokenizer": str(tiny_tokenizer_dir), "seq_length": 64, "num_proc": 1, "sources": srcs}
    data |= {"heldout_fraction": 0.02, "heldout_min_tokens": 0}
    cfg = build_config(Config, {"run_dir": str(tmp_path / "run"), "data": data})
    with caplog.at_level(logging.WARNING, logger="cptkit.data.split"):
        manifest = prepare.run(cfg)
    documents = {name: s["heldout_documents"] for name, s in manifest["sources"].items()}
    assert documents == {"dom": 8, "gen": 2, "held": 5, "off": 0}
    assert manifest["heldout_floor"] == {
        "dom": {"min_documents": 8, "min_tokens": 0, "met": True},
        "gen": {"min_documents": 20, "min_tokens": 0, "met": False},
        "held": {"min_documents": 20, "min_tokens": 0, "met": False},
    }
    warned = [r.getMessage() for r in caplog.records]
    assert any("sources[1] (gen)" in m and "at most a fifth of a source that trains" in m for m in warned)
    assert any("sources[2] (held)" in m and "has only 5 documents" in m for m in warned)
    assert not any("(dom)" in m or "(off)" in m for m in warned)

    out = io.StringIO()
    Console(file=out, width=140, color_system=None).print(heldout_table(manifest))
    text = out.getvalue()
    assert "fraction 0.02" in text and "8 / 0" in text and "20 / 0 not met" in text


def test_negative_floors_are_refused(tmp_path, tiny_tokenizer_dir):
    srcs = sources(tmp_path)[:1]
    srcs[0]["heldout_min_tokens"] = -1
    data = {"tokenizer": str(tiny_tokenizer_dir), "sources": srcs, "heldout_min_documents": -3}
    with pytest.raises(ConfigError) as info:
        build_config(Config, {"run_dir": str(tmp_path / "run"), "data": data})
    assert "data.heldout_min_documents: -3 is negative; use 0 for no floor" in str(info.value)
    assert "data.sources[0].heldout_min_tokens: -1 is negative" in str(info.value)

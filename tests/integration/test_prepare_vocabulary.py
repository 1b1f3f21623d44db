"""`cptkit prepare` with `data.vocabulary.extend`: the extension is learnt on the domain source, saved
with the data, used to tokenize, recorded in the manifest, and reused by a rerun."""

from __future__ import annotations

import logging

import pytest

from cptkit.config import Config, build_config
from cptkit.data.prepare import prepare as prepare_data
from cptkit.errors import CptkitError
from cptkit.testing.prepared import train_lists
from cptkit.testing.tiny import write_jsonl


def _config(tmp_path, tokenizer_dir, paragraphs, **vocabulary) -> Config:
    write_jsonl(tmp_path / "dom.jsonl", paragraphs[:400])
    write_jsonl(tmp_path / "gen.jsonl", paragraphs[400:600])
    sources = [
        {"name": "dom", "path": str(tmp_path / "dom.jsonl")},
        {"name": "gen", "path": str(tmp_path / "gen.jsonl"), "role": "general"},
    ]
    data = {
        "tokenizer": str(tokenizer_dir),
        "seq_length": 64,
        "num_proc": 1,
        "sources": sources,
        "vocabulary": {"min_frequency": 2, **vocabulary},
    }
    return build_config(Config, {"run_dir": str(tmp_path / "run"), "data": data})


def test_prepare_learns_saves_and_tokenizes_with_the_extension(
    tmp_path, tiny_tokenizer_dir, paragraphs, caplog
):
    from transformers import AutoTokenizer

    cfg = _config(tmp_path, tiny_tokenizer_dir, paragraphs, extend=30)
    out = tmp_path / "out"
    prepared = prepare_data(cfg.data, out)
    assert prepared.tokenizer_dir == out / "tokenizer"
    vocabulary = prepared.vocabulary
    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    base = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert len(tok) == len(base) + 30 == vocabulary.size and vocabulary.base_size == len(base)
    assert vocabulary.new_ids == list(range(len(base), len(base) + 30))
    m = prepared.manifest
    assert m["tokenizer"]["fingerprint"] == vocabulary.fingerprint != m["tokenizer"]["base"]["fingerprint"]
    assert m["tokenizer"]["vocab_size"] == len(tok)
    v = m["vocabulary"]
    assert (v["extend"], v["added"], v["base_size"], v["size"]) == (30, 30, len(base), len(base) + 30)
    assert v["sample"]["documents"] == 400 and vocabulary.sample["sources"] == ["dom"]
    assert v["fertility"]["dom"]["after"] < v["fertility"]["dom"]["before"]
    input_ids, _, _ = train_lists(out)
    used = {i for row in input_ids for i in row if i >= len(base)}
    assert used, "the rows use new tokens"
    texts = {p.strip() for p in paragraphs[:600]}
    decoded = tok.decode(input_ids[0], skip_special_tokens=True)
    assert any(piece.strip() and piece.strip() in "\n".join(texts) for piece in decoded.split("\n"))
    # the rerun with the same inputs and settings learns nothing and does nothing
    with caplog.at_level(logging.INFO, logger="cptkit"):
        again = prepare_data(cfg.data, out)
    assert "reusing the vocabulary extension" in caplog.text
    assert again.manifest["fingerprint"] == m["fingerprint"]


def test_rows_decode_to_the_documents(tmp_path, tiny_tokenizer_dir, paragraphs):
    from transformers import AutoTokenizer

    cfg = _config(tmp_path, tiny_tokenizer_dir, paragraphs, extend=30)
    cfg.data.chunking = "chars"
    cfg.data.chunk_chars = 100000  # one document per segment
    cfg.data.seq_length = 4096
    out = tmp_path / "out"
    prepared = prepare_data(cfg.data, out)
    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    input_ids, positions, _ = train_lists(out)
    docs = set()
    for ids, pos in zip(input_ids, positions, strict=True):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:], strict=False):
            docs.add(tok.decode(ids[a:b], skip_special_tokens=True))
    assert docs and docs <= set(paragraphs[:600])


def test_no_domain_source_is_refused(tmp_path, tiny_tokenizer_dir, paragraphs):
    cfg = _config(tmp_path, tiny_tokenizer_dir, paragraphs, extend=5)
    for s in cfg.data.sources:
        s.role = "general"
    with pytest.raises(CptkitError, match="data.vocabulary.sources: no source of role domain"):
        prepare_data(cfg.data, tmp_path / "out")


def test_too_many_tokens_is_refused_before_tokenizing(tmp_path, tiny_tokenizer_dir, paragraphs):
    cfg = _config(tmp_path, tiny_tokenizer_dir, paragraphs, extend=100000)
    with pytest.raises(CptkitError, match="supports only .* lower data.vocabulary.extend"):
        prepare_data(cfg.data, tmp_path / "out")
    assert not (tmp_path / "out" / "store").exists() or not any((tmp_path / "out" / "store").rglob("*.arrow"))


def test_turning_the_extension_off_removes_it(tmp_path, tiny_tokenizer_dir, paragraphs):
    cfg = _config(tmp_path, tiny_tokenizer_dir, paragraphs, extend=10)
    out = tmp_path / "out"
    prepare_data(cfg.data, out)
    cfg.data.vocabulary.extend = 0
    prepared = prepare_data(cfg.data, out)
    assert prepared.tokenizer_dir is None and prepared.vocabulary is None
    assert "vocabulary" not in prepared.manifest and "base" not in prepared.manifest["tokenizer"]

"""The seams of the data side: a chunking strategy is one registered class, document steps are counted
by the runner, corpus steps select indices, and undecodable bytes are counted per stream."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from cptkit.config import Config, build_config
from cptkit.data.chunk import CHUNKERS, Chunker, register_chunker, windows
from cptkit.data.dedup import Deduper
from cptkit.data.document import CountingDecode, Document, Ledger, decode
from cptkit.data.normalize import normalize
from cptkit.data.prepare import prepare
from cptkit.data.split import HeldoutSplit
from cptkit.data.steps import Drop, SourceDocs, run_steps
from cptkit.errors import ConfigError
from cptkit.testing.tiny import sample_texts


class Halves(Chunker):
    """Each document cut in two halves (each cut again into rows of seq_length if longer)."""

    name = "halves"
    summary = "each document cut in two halves"

    def segments(self, lengths, starts):
        lengths = np.asarray(lengths, dtype=np.int64)
        first = (lengths + 1) // 2
        doc = np.repeat(np.arange(len(lengths)), 2)
        off = np.stack([np.zeros_like(first), first], axis=1).ravel()
        length = np.stack([first, lengths - first], axis=1).ravel()
        keep = length > 0
        wdoc, woff, wlen = windows(length[keep], self.seq_length)
        return doc[keep][wdoc], off[keep][wdoc] + woff, wlen


@pytest.fixture
def halves():
    register_chunker(Halves)
    try:
        yield Halves
    finally:
        CHUNKERS.pop(Halves.name)


def test_a_new_chunker_is_one_registered_class(tmp_path, tiny_tokenizer_dir, tiny_tokenizer, halves):
    paragraphs = {normalize(p) for t in sample_texts() for p in t.split("\n\n")}
    texts = sorted(p for p in paragraphs if 200 < len(p) < 1500 and "  " not in p)[:20]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    raw = {"tokenizer": str(tiny_tokenizer_dir), "seq_length": 2048, "num_proc": 1, "heldout_fraction": 0}
    raw["sources"] = [{"name": "docs", "path": str(tmp_path / "docs.jsonl")}]
    cfg = build_config(Config, {"run_dir": str(tmp_path / "run"), "data": raw | {"chunking": "halves"}})
    m = prepare(cfg.data, tmp_path / "out").manifest
    assert m["chunking"] == "halves" and m["sources"]["docs"]["segments"] == 2 * len(texts)
    from cptkit.testing.prepared import train_lists

    input_ids, position_ids, _ = train_lists(tmp_path / "out")
    got = sorted(
        tuple(ids[a:b]) for ids, pos in zip(input_ids, position_ids, strict=True) for a, b in _segments(pos)
    )
    whole = [tiny_tokenizer(t)["input_ids"] + [tiny_tokenizer.eos_token_id] for t in texts]
    halves_of = [
        h for ids in whole for h in (tuple(ids[: (len(ids) + 1) // 2]), tuple(ids[(len(ids) + 1) // 2 :]))
    ]
    assert got == sorted(halves_of)


def _segments(pos):
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return zip(starts, starts[1:], strict=False)


def test_unregistered_chunking_is_a_config_error_naming_the_choices(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_config(Config, {"data": {"tokenizer": "t", "sources": [], "chunking": "halfs"}})
    problem = next(p for p in info.value.problems if p.startswith("data.chunking"))
    assert "is not one of packing, tokens, sentences, chars" in problem and "halves" not in problem
    with pytest.raises(ValueError):
        register_chunker(type("Nameless", (Chunker,), {}))


def test_chunkers_say_what_tokenization_records_and_how_held_out_ids_are_made():
    made = {name: cls(seq_length=64, chunk_chars=100) for name, cls in CHUNKERS.items()}
    assert {n: c.unit for n, c in made.items()} == {
        "packing": "document",
        "tokens": "document",
        "sentences": "sentences",
        "chars": "chars:100",
    }
    assert [n for n, c in made.items() if c.heldout_whole] == ["chars"]
    with pytest.raises(ValueError, match="needs unit starts"):
        made["sentences"].segments(np.array([10]), None)


def test_document_steps_run_in_order_and_drops_are_counted_by_reason():
    def shout(text):
        return text.upper()

    def no_digits(text):
        return Drop("has_digits") if any(c.isdigit() for c in text) else text

    ledger = Ledger()
    docs = [Document("a b", "f:1"), Document("a 1", "f:2"), Document("x 2", "f:3"), Document("c", "f:4")]
    kept = list(run_steps([shout, no_digits], docs, ledger))
    assert [(d.text, d.where) for d in kept] == [("A B", "f:1"), ("C", "f:4")]
    assert ledger.drops == {"has_digits": 2} and ledger.examples == {"has_digits": "f:2"}


def test_corpus_steps_select_among_the_documents_still_in_play():
    import pyarrow as pa

    from cptkit.config.data import SourceConfig

    hashes = [bytes([i % 5]) * 16 for i in range(10)]  # documents 5-9 repeat 0-4
    table = pa.table({"hash": pa.array(hashes, pa.binary(16))})
    source = SourceDocs("s", SourceConfig(name="s", path=".", weight=0), table)
    dedup = Deduper()
    kept = dedup.select(source, np.arange(10))
    assert kept.tolist() == [0, 1, 2, 3, 4]
    assert dedup.select(source, np.array([7, 9])).tolist() == []  # remembered across calls (sources)
    held = HeldoutSplit(0.02, None, seed=1).select(source, kept)
    assert held.tolist() == kept.tolist()  # weight 0: held out whole
    assert HeldoutSplit(0.02, 2, seed=1).select(source, kept).size == 2


def test_undecodable_bytes_are_counted_per_stream():
    good = "caf\u00e9 \ufffd ok\n".encode()  # a genuine U+FFFD is not an error
    bad = b"caf\xe9 latin-1\n\xff\xfe end\n"
    assert decode(good) == ("caf\u00e9 \ufffd ok\n", 0)
    assert decode(bad)[1] == 3
    one, two = CountingDecode(io.BytesIO(good * 3000)), CountingDecode(io.BytesIO(bad * 1000 + good))
    text_one = io.TextIOWrapper(one, encoding="utf-8", errors="replace").read()
    text_two = io.TextIOWrapper(two, encoding="utf-8", errors="replace").read()
    assert (one.errors, two.errors) == (0, 3000)
    assert text_one == good.decode() * 3000 and text_two.count("\ufffd") == 3001


def test_filters_pickle_for_process_pools_started_without_fork():
    import pickle

    from cptkit.config.data import FilterConfig
    from cptkit.data.filters import build_filters
    from cptkit.data.steps import apply_steps

    filters = build_filters(FilterConfig(min_chars=3, max_chars=50, min_words=2, max_non_text_fraction=0.5))
    copied = pickle.loads(pickle.dumps(filters))
    for text in ("ok then", "x", "one", "word " * 20, "two words"):
        assert apply_steps(copied, text) == apply_steps(filters, text)

"""`cptkit prepare` over a folder of good and damaged inputs: every good document kept, every damaged
file named once with its reason, the rows before the damage kept, and the rerun a no-op."""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import os

import pytest
import zstandard

from cptkit.config import Config, build_config
from cptkit.config.data import FilterConfig
from cptkit.data.filters import build_filters, first_reason
from cptkit.data.normalize import normalize
from cptkit.data.prepare import prepare
from cptkit.testing.files import make_unreadable
from cptkit.testing.tiny import sample_texts


def _paragraphs(n: int) -> list[str]:
    """Unique real paragraphs that pass the default filters unchanged by normalisation."""
    filters = build_filters(FilterConfig())
    seen: list[str] = []
    for text in sample_texts():
        for p in text.split("\n\n"):
            p = normalize(p)
            if len(p) >= 60 and p not in seen and first_reason(p, filters) is None:
                seen.append(p)
                if len(seen) == n:
                    return seen
    raise AssertionError("not enough sample paragraphs")


def _jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def test_prepare_keeps_every_good_document_and_names_each_damaged_file(tmp_path, tiny_tokenizer_dir, caplog):
    texts = _paragraphs(160)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = texts[:20]
    (corpus / "a.txt").write_text(good[0], encoding="utf-8")
    (corpus / "b.md").write_bytes(codecs.BOM_UTF16_LE + good[1].encode("utf-16-le"))
    (corpus / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(good[2:10])))
    (corpus / "d.csv").write_bytes(
        ("text\n" + "".join(json.dumps(t) + "\n" for t in good[10:14])).encode("utf-16")
    )
    (corpus / "e.jsonl.gz").write_bytes(gzip.compress(_jsonl(good[14:20])))

    frames = b"".join(
        zstandard.ZstdCompressor().compress(_jsonl(texts[i : i + 10])) for i in range(20, 120, 10)
    )
    cut = frames[: len(frames) // 2]  # inside the fifth or sixth frame of ten
    (corpus / "cut.jsonl.zst").write_bytes(cut)
    decoded = zstandard.ZstdDecompressor().stream_reader(cut, read_across_frames=True).read()
    before_cut = texts[20 : 20 + decoded.count(b"\n")]
    assert 0 < len(before_cut) < 100
    damaged = zstandard.ZstdCompressor().compress(_jsonl(texts[120:140]))
    (corpus / "corrupt.jsonl.zst").write_bytes(damaged[:20] + b"\xff" * 50 + damaged[70:])
    deflated = gzip.compress(_jsonl(texts[140:160]))
    (corpus / "corrupt.jsonl.gz").write_bytes(deflated[:100] + bytes(range(256)) * 4 + deflated[1124:])
    if not make_unreadable(corpus / "locked.txt"):
        pytest.skip("no unreadable kind of file here")
    bad = ["corrupt.jsonl.gz", "corrupt.jsonl.zst", "cut.jsonl.zst", "locked.txt"]

    cfg = build_config(
        Config,
        {
            "run_dir": str(tmp_path / "run"),
            "data": {
                "tokenizer": str(tiny_tokenizer_dir),
                "seq_length": 64,
                "num_proc": 1,
                "sources": [{"name": "messy", "path": str(corpus)}],
            },
        },
    )
    out = tmp_path / "run" / "data"
    with caplog.at_level(logging.WARNING):
        prepared = prepare(cfg.data, out)
    source = prepared.manifest["sources"]["messy"]
    assert source["documents"] == len(good) + len(before_cut) and source["duplicates"] == 0
    assert source["drops"] == {"unreadable_file": len(bad)} and source["repairs"] == {}
    assert source["examples"]["unreadable_file"].startswith(str(corpus / bad[0]))
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unreadable_file")]
    assert [m.split(" ")[1] for m in warned] == [str(corpus / name) for name in bad]
    inputs = {os.path.basename(i["path"]): i["sha256"] for i in prepared.manifest["inputs"]}
    assert inputs.pop("locked.txt") is None and all(len(sha) == 64 for sha in inputs.values())

    rerun = prepare(cfg.data, out)
    assert rerun.manifest["fingerprint"] == prepared.manifest["fingerprint"]
    assert rerun.manifest["sources"]["messy"]["drops"] == source["drops"]

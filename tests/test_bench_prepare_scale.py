"""The prepare scale benchmark (bench/prepare_scale.py, process_tree.py, scale_corpus.py): the all-at-once
packing reference against cptkit's own packer, the memory sampler (anonymous and file pages apart, the
watchdog), and the corpus's copies (distinct, not near duplicates of each other)."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import prepare_scale  # noqa: E402
import process_tree  # noqa: E402
import scale_corpus  # noqa: E402

from cptkit.data.pack import best_fit_pack  # noqa: E402
from cptkit.testing.tiny import sample_texts  # noqa: E402

LIMITS = argparse.Namespace(interval=0.05, max_anon_gb=8.0, min_free_gb=0.2, clean_cores=0.25)


@pytest.mark.parametrize("capacity", [16, 64, 2048])
def test_best_fit_rows_counts_the_rows_of_cptkits_packer(capacity):
    rng = random.Random(capacity)
    for _ in range(5):
        lengths = [rng.choice([capacity, rng.randint(1, capacity), rng.randint(1, 8)]) for _ in range(3000)]
        assert prepare_scale.best_fit_rows(lengths, capacity) == len(best_fit_pack(lengths, capacity))


def test_packing_reference_reads_the_prepared_segments(tmp_path, tiny_tokenizer_dir):
    from cptkit.config.data import DataConfig, SourceConfig
    from cptkit.data.prepare import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(sample_texts(40)):
        (corpus / f"{i:03d}.txt").write_text(text)
    data = DataConfig(
        tokenizer=str(tiny_tokenizer_dir),
        seq_length=256,
        sources=[SourceConfig(name="docs", path=str(corpus))],
        heldout_min_documents=2,
        heldout_min_tokens=0,
    )
    manifest = prepare(data, tmp_path / "out").manifest
    reference = prepare_scale.packing_reference(tmp_path / "out", 256)
    assert reference["tokens"] == manifest["totals"]["trained_tokens"]
    # one window holds every segment here: prepare's packing is best-fit decreasing of all of them
    assert reference["rows"] == manifest["totals"]["rows"]
    assert reference["packing_efficiency"] == manifest["totals"]["packing_efficiency"]


def test_sampler_sees_allocated_and_mapped_memory_apart(tmp_path):
    mapped = tmp_path / "mapped.bin"
    mapped.write_bytes(os.urandom(1 << 20) * 160)
    child = (
        "import mmap, time\n"
        "held = bytearray(200 << 20)\n"
        "for i in range(0, len(held), 4096): held[i] = 1\n"
        f"f = open({str(mapped)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
        "total = sum(m[i] for i in range(0, len(m), 4096))\n"
        "time.sleep(0.5)\n"
    )
    run = process_tree.run_measured([sys.executable, "-c", child], tmp_path / "log", dict(os.environ), LIMITS)
    memory = run["_sampler"].summary()
    assert run["rc"] == 0 and run["stopped"] is None
    assert 0.19 <= memory["peak_anon_gb"] < 0.5
    assert memory["peak_file_gb"] >= 0.15
    assert memory["peak_rss_gb"] >= memory["anon_at_peak_gb"] + 0.15


def test_watchdog_stops_a_child_past_its_limit(tmp_path):
    child = "import time\nheld = []\nwhile True:\n    held.append(bytearray(20 << 20)); time.sleep(0.01)\n"
    limits = argparse.Namespace(**(vars(LIMITS) | {"max_anon_gb": 0.3}))
    run = process_tree.run_measured([sys.executable, "-c", child], tmp_path / "log", dict(os.environ), limits)
    assert run["rc"] != 0 and "anonymous RSS" in run["stopped"]
    assert run["_sampler"].summary()["peak_rss_gb"] < 1.0


def test_copies_are_distinct_and_not_near_duplicates():
    from cptkit.data.near_dedup import shingle_hashes

    docs = [t for t in sample_texts() if len(t) > 2000]
    for i in range(0, len(docs), 5):
        copies = [scale_corpus.recombined(docs, i, k, seed=1) for k in range(4)]
        assert copies[0] == docs[i]
        assert len(set(copies)) == 4
        assert copies[2] == scale_corpus.recombined(docs, i, 2, seed=1)  # the same at every multiple
        shingles = [set(shingle_hashes(c).tolist()) for c in copies]
        for a in range(4):
            for b in range(a + 1, 4):
                assert len(shingles[a] & shingles[b]) / len(shingles[a] | shingles[b]) < 0.8


def test_groff_text_reads_like_the_page():
    page = (
        '.\\" a comment\n.TH LS "1" "September 2022"\n.SH NAME\nls \\- list directory contents\n'
        ".SH DESCRIPTION\n.PP\nSort entries unless \\fB\\-\\-sort\\fR is given.\n"
    )
    text = scale_corpus.groff_text(page)
    assert "ls - list directory contents" in text
    assert "Sort entries unless --sort is given." in text
    assert "\\f" not in text and "comment" not in text
    assert scale_corpus.groff_text(".so man1/other.1\n") is None


@pytest.mark.slow
def test_prepare_scale_end_to_end(tmp_path, tiny_tokenizer_dir):
    """The script on a tiny 1x corpus: the encode and prepare children, the reference, the JSON."""
    import gzip

    corpus = tmp_path / "corpus"
    texts = sample_texts()
    for name, part in (("1x", texts[10:]), ("general", texts[:10])):
        (corpus / name).mkdir(parents=True)
        with gzip.open(corpus / name / "a.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in part)
    size = {n: sum(len(t.encode()) for t in p) for n, p in (("1x", texts[10:]), ("general", texts[:10]))}
    (corpus / "corpus.json").write_text(
        json.dumps(
            {
                "general": {"path": str(corpus / "general"), "documents": 10, "text_bytes": size["general"]},
                "multiples": {
                    "1": {"path": str(corpus / "1x"), "documents": len(texts) - 10, "text_bytes": size["1x"]}
                },
            }
        )
    )
    out = tmp_path / "results.json"
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "prepare_scale.py"), "--label", "test", "--multiples", "1",
         "--corpus", str(corpus), "--tokenizer", str(tiny_tokenizer_dir), "--work", str(tmp_path / "work"),
         "--seq-length", "256", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(out.read_text())["labels"]["test"]["runs"]["1"]
    prepare, encode = run["prepare"], run["encode"]
    assert prepare["rc"] == 0 and encode["rc"] == 0
    assert prepare["packing_efficiency"] == run["packing_all_at_once"]["packing_efficiency"]
    assert prepare["memory"]["peak_rss_gb"] > encode["rss_gb"]["python"] > 0
    assert abs(encode["tokens"] / prepare["tokens"] - 1) < 0.05  # the same texts, raw against normalised
    assert not (tmp_path / "work" / "test-1x" / "run").exists()  # prepared folders removed unless --keep

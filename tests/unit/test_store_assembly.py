"""Assembly from the token store: train/ as an index read back equals best-fit packing over the same
segments, chunking in blocks of documents equals one call, per-source caps, and memory that does not
grow with the corpus' tokens."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cptkit.config.data import DataConfig, SourceConfig
from cptkit.data import assemble as assemble_mod
from cptkit.data.assemble import StoreShard, assemble
from cptkit.data.chunk import CHUNKERS
from cptkit.data.pack import best_fit_pack
from cptkit.data.shards import store_schema
from cptkit.data.steps import SourceDocs
from cptkit.data.write import write_train
from cptkit.testing.prepared import read_rows, train_index

FP = "0123456789abcdef"


def store_shard(
    folder: Path, source: str, key: str, docs: list[np.ndarray], starts=None, batch_docs: int | None = None
) -> StoreShard:
    """A store file of `docs` (their ids; each document's hash from its ids, so equal ids are duplicates)
    written as tokenization writes one (in record batches of `batch_docs` documents; one batch when
    None), opened as assembly opens one."""
    path = folder / "store" / source / f"{key}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = store_schema(FP)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int32)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(docs).astype(np.int32)))
    if starts is None:
        unit_starts = pa.nulls(len(docs), pa.list_(pa.int32()))
    else:
        bounds = np.concatenate([[0], np.cumsum([len(s) for s in starts])]).astype(np.int32)
        unit_starts = pa.ListArray.from_arrays(
            pa.array(bounds), pa.array(np.concatenate(starts).astype(np.int32))
        )
    batch = pa.record_batch(
        [
            pa.array([hashlib.blake2b(d.tobytes(), digest_size=16).digest() for d in docs], pa.binary(16)),
            pa.array([f"{source}:{i}" for i in range(len(docs))]),
            pa.array([4 * len(d) for d in docs], pa.int64()),
            pa.array([4 * len(d) for d in docs], pa.int64()),
            pa.array([f"document {i} of {source}" for i in range(len(docs))], pa.large_string()),
            ids,
            unit_starts,
        ],
        schema=schema,
    )
    step = batch_docs or len(docs)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for lo in range(0, len(docs), step):
            writer.write_batch(batch.slice(lo, step))
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    return StoreShard(path.relative_to(folder).as_posix(), table, path)


def data_config(sources: list[SourceConfig], **kw) -> DataConfig:
    kw = {"heldout_fraction": 0.1, "heldout_min_documents": 0, "heldout_min_tokens": 0, "seed": 3} | kw
    return DataConfig(tokenizer="unused", sources=sources, **kw)


def random_docs(rng, n, low, high, vocab=1000) -> list[np.ndarray]:
    return [rng.integers(0, vocab, rng.integers(low, high)).astype(np.int32) for _ in range(n)]


def test_the_index_read_back_is_best_fit_packing_over_the_same_segments(tmp_path):
    """The arrays of train/ are what best-fit packing over the mixed segments gives (rows shuffled with
    the generator where the mix left it), and the rows they name hold the documents' own tokens."""
    rng = np.random.default_rng(0)
    a = random_docs(rng, 40, 10, 300)
    b = random_docs(rng, 30, 10, 200)
    store = {
        "a": [store_shard(tmp_path, "a", "k1", a[:25]), store_shard(tmp_path, "a", "k2", a[25:])],
        "b": [store_shard(tmp_path, "b", "k3", b)],
    }
    cfg = data_config([SourceConfig(name="a", path="."), SourceConfig(name="b", path=".")], seq_length=128)
    result = assemble(store, cfg, encoder=None)
    written = write_train(result.rows, result.shards, tmp_path / "train")
    index, arrays = train_index(tmp_path)

    rows = result.rows
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = rows.rng_state
    packed = best_fit_pack(rows.seg_len.tolist(), 128)
    order = [i for r in rng.permutation(len(packed)) for i in packed[r]]
    assert (arrays["segment_starts"] == rows.seg_start[order]).all()
    assert (arrays["segment_lengths"] == rows.seg_len[order]).all()
    assert (arrays["segment_sources"] == rows.seg_source[order]).all()
    rng.bit_generator.state = rows.rng_state
    sizes = [len(packed[r]) for r in rng.permutation(len(packed))]
    assert arrays["row_offsets"].tolist() == np.concatenate([[0], np.cumsum(sizes)]).tolist()
    assert index["rows"] == written.rows == len(packed) and written.windows == 1
    assert index["shards"] == [
        {"path": f"store/{s}/{k}.arrow", "tokens": int(sum(map(len, d))), "documents": len(d)}
        for s, k, d in (("a", "k1", a[:25]), ("a", "k2", a[25:]), ("b", "k3", b))
    ]
    assert index["tokenizer_fingerprint"] == FP and index["tokens"] == rows.num_tokens
    # the rows hold the documents' own tokens: each segment a run inside one document
    space = np.concatenate(a + b)
    doc_of = np.repeat(np.arange(len(a + b)), [len(d) for d in a + b])
    want = [
        space[st : st + n]
        for st, n in zip(arrays["segment_starts"], arrays["segment_lengths"], strict=True)
        if doc_of[st] == doc_of[st + n - 1]
    ]
    assert len(want) == index["segments"]
    got = []
    for input_ids, position_ids, _ in read_rows(tmp_path):
        assert len(input_ids) <= 128
        starts = np.flatnonzero(position_ids == 0).tolist() + [len(input_ids)]
        got += [input_ids[s:e] for s, e in zip(starts, starts[1:], strict=False)]
    assert [g.tolist() for g in got] == [w.tolist() for w in want]


def test_chunking_in_blocks_of_documents_equals_one_call(monkeypatch):
    """Documents chunked a block at a time give the segments of one call over them all (sentences: units
    merged within a document only)."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 400, 50)
    starts = [
        np.unique(np.concatenate([[0], rng.integers(1, n, 5)])) if n > 1 else np.zeros(1) for n in lengths
    ]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in starts])]).astype(np.int32)
    column = pa.chunked_array(
        [pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(starts).astype(np.int32)))]
    )
    source = SourceDocs("s", None, pa.table({"starts": column}))
    docs = np.sort(rng.choice(50, 40, replace=False))
    chunker = CHUNKERS["sentences"](seq_length=128, chunk_tokens=100)
    whole = chunker.segments(lengths[docs], [starts[d].astype(np.int32) for d in docs])
    for max_docs, max_units in ((7, 1 << 18), (1 << 16, 20), (1 << 16, 1)):
        monkeypatch.setattr(assemble_mod, "_CHUNK_DOCS", max_docs)
        monkeypatch.setattr(assemble_mod, "_CHUNK_UNITS", max_units)
        blocks = assemble_mod._segments(chunker, source, lengths, docs)
        for x, y in zip(whole, blocks, strict=True):
            assert x.tolist() == y.tolist()


def test_caps_take_the_leading_documents_before_dedup(tmp_path):
    """A capped source keeps its first documents (whole, reading order) before dedup: a repeat past the
    cap is not counted as a duplicate, and the cap's documents and tokens are counted apart."""
    rng = np.random.default_rng(2)
    docs = random_docs(rng, 20, 50, 60)
    docs[15] = docs[3]  # a repeat past the cap
    docs[5] = docs[1]  # a repeat within it
    store = {"a": [store_shard(tmp_path, "a", "k", docs)]}
    tokens = int(sum(len(d) for d in docs[:10]))
    for cap in (
        {"max_documents": 10},
        {"max_tokens": tokens},
        {"max_documents": 12, "max_tokens": tokens + 1},
    ):
        cfg = data_config([SourceConfig(name="a", path=".", **cap)], heldout_fraction=0.0)
        result = assemble(store, cfg, encoder=None)
        s = result.stats["a"]
        assert (s["documents"], s["duplicates"], s["capped_documents"]) == (9, 1, 10), cap
        assert s["capped_tokens"] == sum(len(d) for d in docs[10:]) and s["tokens"] == tokens - len(docs[5])
        assert s["train_tokens"] == result.rows.num_tokens == s["tokens"]
    result = assemble(store, data_config([SourceConfig(name="a", path=".")], heldout_fraction=0.0), None)
    assert (result.stats["a"]["capped_documents"], result.stats["a"]["duplicates"]) == (0, 2)


@pytest.mark.parametrize("chunking", ["packing", "sentences"])
def test_assembly_allocates_nothing_the_size_of_the_corpus_tokens(tmp_path, chunking, monkeypatch):
    """Assembly and the train/ write on a corpus of long documents (4M tokens, 16 MiB of int32 ids, in
    a store file of 8 record batches, so each column is in chunks) stay far below the token bytes: they
    read sizes and hashes, not ids (the held-out documents' alone, taken chunk by chunk: a take from
    the whole chunked column would join its chunks into one copy of it first).
    Sentence starts are read a block of units at a time (here 4,096 units, about 80 bytes each while
    chunked: the default block is 1<<18)."""
    monkeypatch.setattr(assemble_mod, "_CHUNK_UNITS", 4096)
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 50_000, 1 << 16).astype(np.int32) for _ in range(64)]
    starts = [np.arange(0, 1 << 16, 50) for _ in docs] if chunking == "sentences" else None
    store = {"long": [store_shard(tmp_path, "long", "k", docs, starts, batch_docs=8)]}
    token_bytes = sum(d.nbytes for d in docs)
    del docs
    cfg = data_config([SourceConfig(name="long", path=".")], heldout_fraction=0.02, chunking=chunking)
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    default = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        result = assemble(store, cfg, encoder=None)
        write_train(result.rows, result.shards, tmp_path / "train")
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(default)
    held = sum(a.nbytes for h in result.heldout.values() for a in h.ids)
    assert result.stats["long"]["heldout_documents"] == 1 and held == 1 << 18  # one document: 256 KiB
    print(f"{chunking}: peaks {python_peak:,} (Python, numpy) and {pool.max_memory():,} (Arrow) bytes")
    assert python_peak < token_bytes / 16, python_peak  # numpy and Python objects: under 1 MiB
    assert pool.max_memory() < token_bytes / 16, pool.max_memory()  # Arrow's buffers
    del result  # its held-out ids view buffers of `pool`: gone before the pool is


def _mapped_file_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status (Linux)")
def test_rows_read_through_shards_leave_no_store_pages_mapped(tmp_path):
    """Held-out and near-dedup reads go through a fresh mapping of each shard file, closed once its rows
    are copied: after reading a 1 MiB document of each of 8 shards, the process maps (almost) none of
    the 8 MiB read, where the source's own table would keep every page it touched."""
    shards = []
    for k in range(8):
        docs = [np.full(1 << 18, k, np.int32), np.full(8, k, np.int32)]  # 1 MiB of ids, then a short one
        shards.append(store_shard(tmp_path, "s", f"k{k}", docs))
    table = pa.concat_tables([s.table for s in shards])
    source = SourceDocs("s", None, table, shards)
    before = _mapped_file_bytes()
    ids = source.take("input_ids", np.arange(0, 16, 2))  # each shard's long document
    assert [int(v[0]) for v in ids.to_pylist()] == list(range(8))
    grown = _mapped_file_bytes() - before
    assert grown < 2 << 20, grown

"""Training reads the token store as it is: `PackedRows` over a format-3 folder gives each row as its
segments say (checked against the documents themselves), pickles as its folder for DataLoader workers,
and a folder that cannot be trained on is refused with the file and what to do."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from cptkit.data.prepared import Prepared
from cptkit.data.store import TokenSpace, TrainIndex
from cptkit.data.view import PackedRows
from cptkit.errors import CptkitError
from cptkit.testing.store import write_prepared, write_store_file
from cptkit.train.collator import PackedCollator

SEQ = 48
TOKENIZER = {
    "name_or_path": "synthetic",
    "fingerprint": "f00dfeedf00dfeed",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def documents(seed: int, n: int) -> list[np.ndarray]:
    """`n` documents of 1 to 130 tokens (some longer than a row), ids that say where they come from."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 30000, size=int(rng.integers(1, 130)), dtype=np.int32) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[np.ndarray]]:
    return {"dom": documents(1, 90), "gen": documents(2, 40), "tiny": documents(3, 3)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("prepared")
    # small record batches and several files per source: rows gather across batches and files
    rows = write_prepared(out, corpus, SEQ, TOKENIZER, seed=5, batch_documents=7, shards_per_source=3)
    return out, rows


def expected_row(corpus, segments, source_index) -> dict[str, list[int]]:
    ids, pos, sources = [], [], []
    for s in segments:
        ids += corpus[s.source][s.document][s.offset : s.offset + s.length].tolist()
        pos += list(range(s.length))
        sources.append(source_index[s.source])
    return {"input_ids": ids, "position_ids": pos, "source_ids": sources}


def as_lists(row) -> dict[str, list[int]]:
    return {k: np.asarray(v).tolist() for k, v in row.items()}


def test_each_row_is_its_segments_of_the_documents(folder, corpus):
    out, plan = folder
    prepared = Prepared.load(out)
    rows = prepared.train_rows()
    assert isinstance(rows, PackedRows) and isinstance(rows, torch.utils.data.Dataset)
    assert len(rows) == len(plan)
    assert rows.column_names == ["input_ids", "position_ids", "source_ids"]
    want = [expected_row(corpus, segments, prepared.source_index) for segments in plan]
    assert [as_lists(rows[i]) for i in range(len(rows))] == want
    assert [as_lists(r) for r in rows] == want  # iteration
    assert as_lists(rows[-1]) == want[-1]
    picked = [7, 0, 7, len(rows) - 1, 3]
    assert [as_lists(r) for r in rows.__getitems__(picked)] == [want[i] for i in picked]
    row = rows[0]
    assert {v.dtype for v in row.values()} == {np.dtype(np.int32)}
    assert all(max(len(w["input_ids"]) for w in want) <= SEQ for w in want)
    assert sum(len(w["input_ids"]) for w in want) == sum(len(d) for docs in corpus.values() for d in docs)
    with pytest.raises(IndexError):
        rows[len(rows)]


def test_the_token_space_is_the_listed_files_end_to_end(folder, corpus):
    out, _ = folder
    index = TrainIndex(out)
    space = TokenSpace(out, index.shards, index.fingerprint)
    flat = np.concatenate([d for docs in corpus.values() for d in docs])
    assert space.num_tokens == len(flat) == sum(s.tokens for s in index.shards)
    rng = np.random.default_rng(0)
    for _ in range(200):  # runs that cross record batches and files too
        start = int(rng.integers(0, len(flat)))
        length = int(rng.integers(0, min(400, len(flat) - start) + 1))
        assert space.gather(start, length).tolist() == flat[start : start + length].tolist()
    with pytest.raises(CptkitError, match="reaches past"):
        space.gather(len(flat) - 2, 5)


def test_rows_pickle_as_their_folder_and_reopen_on_first_use(folder):
    out, _ = folder
    rows = Prepared.load(out).train_rows()
    data = pickle.dumps(rows)
    assert len(data) < 500  # the folder, not the arrays
    again = pickle.loads(data)
    assert again._space is None  # nothing opened yet
    assert [as_lists(again[i]) for i in (0, 5, len(rows) - 1)] == [
        as_lists(rows[i]) for i in (0, 5, len(rows) - 1)
    ]


def test_dataloader_workers_give_the_batches_of_the_main_process(folder):
    out, _ = folder
    rows = Prepared.load(out).train_rows()
    collator = PackedCollator(pad_token_id=0)

    def batches(workers: int):
        loader = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=collator, num_workers=workers)
        return [{k: v.tolist() for k, v in b.items()} for b in loader]

    assert batches(2) == batches(0)


def test_a_batch_is_the_collated_rows_in_order(folder):
    out, _ = folder
    rows = Prepared.load(out).train_rows()
    collator = PackedCollator(pad_token_id=0)
    batch = collator(rows.__getitems__([0, 1, 2]))
    one_by_one = collator([rows[0], rows[1], rows[2]])
    assert all(torch.equal(batch[k], one_by_one[k]) for k in batch)
    assert set(batch) == {"input_ids", "position_ids", "labels", "source_ids"}


# --- what is refused, and how it says so ---


@pytest.fixture
def copy(folder, tmp_path):
    out, _ = folder
    dest = tmp_path / "copy"
    shutil.copytree(out, dest)
    return dest


def index_of(folder) -> dict:
    return json.loads((folder / "train" / "index.json").read_text())


def test_a_missing_store_file_is_named(copy):
    shard = copy / index_of(copy)["shards"][2]["path"]
    shard.unlink()
    with pytest.raises(CptkitError, match="missing") as e:
        Prepared.load(copy)
    assert str(shard) in str(e.value) and "cptkit prepare --force" in str(e.value)


def test_a_store_file_of_another_tokenizer_is_refused(copy, corpus):
    entry = index_of(copy)["shards"][0]
    write_store_file(copy / entry["path"], corpus["dom"][:30], "0123456789abcdef", batch_documents=7)
    with pytest.raises(CptkitError, match="another tokenizer") as e:
        Prepared.load(copy)
    message = str(e.value)
    assert entry["path"] in message and "0123456789abcdef" in message and "cptkit prepare --force" in message


def test_a_store_file_of_another_format_is_refused(copy, corpus):
    entry = index_of(copy)["shards"][0]
    write_store_file(copy / entry["path"], corpus["dom"][:30], TOKENIZER["fingerprint"], store_format="1")
    with pytest.raises(CptkitError, match="not a store file of format 2") as e:
        Prepared.load(copy)
    assert entry["path"] in str(e.value)


def test_a_store_file_replaced_by_other_documents_is_refused(copy, corpus):
    entry = index_of(copy)["shards"][0]
    write_store_file(copy / entry["path"], corpus["dom"][1:30], TOKENIZER["fingerprint"])
    with pytest.raises(CptkitError, match="the file was replaced") as e:
        Prepared.load(copy)
    assert entry["path"] in str(e.value)


def test_a_half_written_store_file_is_refused(copy):
    shard = copy / index_of(copy)["shards"][1]["path"]
    shard.write_bytes(shard.read_bytes()[:-100])  # no footer: a killed writer
    with pytest.raises(CptkitError, match="unreadable as a store file") as e:
        Prepared.load(copy)
    assert str(shard) in str(e.value) and "cptkit prepare --force" in str(e.value)


def test_a_truncated_array_is_refused(copy):
    path = copy / "train" / "segment_starts.bin"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CptkitError, match="truncated") as e:
        Prepared.load(copy)
    assert str(path) in str(e.value) and "cptkit prepare --force" in str(e.value)


@pytest.mark.parametrize("where", ["index", "manifest"])
def test_an_older_format_is_refused_with_what_to_run(copy, where):
    path = copy / ("train/index.json" if where == "index" else "manifest.json")
    data = json.loads(path.read_text())
    data["format" if where == "index" else "format_version"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(CptkitError) as e:
        Prepared.load(copy)
    assert (
        str(e.value)
        == f"{path if where == 'index' else copy}: prepared by an older cptkit (format 2): run cptkit prepare --force"
    )


def test_a_newer_format_asks_for_a_newer_cptkit(copy):
    path = copy / "train" / "index.json"
    path.write_text(json.dumps({**index_of(copy), "format": 4}))
    with pytest.raises(CptkitError, match="newer cptkit"):
        Prepared.load(copy)


def test_an_index_of_another_tokenizer_than_the_manifest_is_refused(copy):
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tokenizer"]["fingerprint"] = "aaaaaaaaaaaaaaaa"
    path.write_text(json.dumps(manifest))
    with pytest.raises(CptkitError, match="mixes two preparations"):
        Prepared.load(copy)


def test_a_missing_index_is_named(copy):
    (copy / "train" / "index.json").unlink()
    with pytest.raises(CptkitError, match="index.json: missing"):
        Prepared.load(copy)


def test_a_copy_refuses_an_index_that_changed_after_its_original_opened(copy):
    rows = Prepared.load(copy).train_rows()
    data = pickle.dumps(rows)
    assert len(pickle.loads(data)[0]["input_ids"])  # the same preparation: read
    index = copy / "train" / "index.json"
    index.write_text(index.read_text().replace('"format"', '"format" ', 1))  # another preparation's bytes
    with pytest.raises(CptkitError, match="changed while a run read it"):
        pickle.loads(data)[0]

"""Readers: every supported format, and every kind of bad input counted with its file:line."""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import os

import pytest

from cptkit.data.document import Ledger
from cptkit.data.readers import plan_source, read_documents, walk
from cptkit.errors import CptkitError
from cptkit.testing.files import make_unreadable


def _read(path, text_field="text"):
    plan = plan_source(path, text_field, "data.sources[0]")
    ledger = Ledger()
    docs = list(read_documents(plan, plan.files, text_field, ledger))
    return docs, ledger


def test_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (tmp_path / "a.txt").write_text("text file", encoding="utf-8")
    (tmp_path / "b.md").write_text("# markdown", encoding="utf-8")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gz row 1"}) + "\n\n" + json.dumps({"text": "gz row 2"}) + "\n")
    (tmp_path / "d.json").write_text(json.dumps([{"body": "x", "text": "array row"}]), encoding="utf-8")
    with open(tmp_path / "e.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerow([1, "csv row,\nwith a newline"])
    pq.write_table(pa.table({"text": ["parquet row"]}), tmp_path / "f.parquet")
    (tmp_path / "g.rst.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zst text"))
    (tmp_path / "notes.bin").write_bytes(b"ignored")
    docs, ledger = _read(tmp_path)
    assert [d.text for d in docs] == [
        "text file",
        "# markdown",
        "gz row 1",
        "gz row 2",
        "array row",
        "csv row,\nwith a newline",
        "parquet row",
        "zst text",
    ]
    assert docs[3].where.endswith("c.jsonl.gz:3") and not ledger.drops


def test_saved_dataset_and_datasetdict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"content": ["one", None, "two"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    docs, ledger = _read(tmp_path / "ds", text_field="content")
    assert [d.text for d in docs] == ["one", "two"] and ledger.drops == {"no_text_field": 1}
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CptkitError, match="without a 'train' split.*validation"):
        plan_source(tmp_path / "dd", "content", "data.sources[0]")
    with pytest.raises(CptkitError, match="'text' is not a column"):
        plan_source(tmp_path / "ds", "text", "data.sources[0]")
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dt"))
    assert len(_read(tmp_path / "dt", text_field="content")[0]) == 2


def test_bad_rows_are_counted_with_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(
        b'{"text": "good"}\n{not json\n{"other": 1}\n{"text": 5}\n[1, 2]\n{"text": "caf\xe9 latin-1"}\n'
    )
    docs, ledger = _read(path)
    assert [d.text for d in docs] == ["good", "caf\ufffd latin-1"]
    assert ledger.drops == {
        "malformed_json": 1,
        "no_text_field": 1,
        "text_not_a_string": 1,
        "row_not_an_object": 1,
    }
    assert ledger.examples["malformed_json"] == f"{path}:2"
    assert ledger.examples["no_text_field"] == f"{path}:3"
    assert ledger.repairs == {"encoding_errors": 1} and ledger.examples["encoding_errors"].startswith(
        f"{path}:6"
    )


def test_binary_and_non_utf8_files(tmp_path):
    (tmp_path / "blob.txt").write_bytes(b"\x89PNG\x00\x00\x01binary")
    (tmp_path / "latin.txt").write_bytes("na\u00efve caf\u00e9".encode("latin-1"))
    (tmp_path / "blob.jsonl").write_bytes(b"\x00\x01\x02" * 100)
    docs, ledger = _read(tmp_path)
    assert [d.text for d in docs] == ["na\ufffdve caf\ufffd"]
    assert ledger.drops == {"binary_file": 2}
    assert "latin.txt (2 undecodable bytes replaced)" in ledger.examples["encoding_errors"]


def test_missing_text_field_in_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.csv").write_text("id,body\n1,hello\n2,world\n", encoding="utf-8")
    pq.write_table(pa.table({"body": ["x", "y", "z"]}), tmp_path / "b.parquet")
    docs, ledger = _read(tmp_path)
    assert docs == [] and ledger.drops == {"no_text_field": 5}
    assert ledger.examples["no_text_field"] == f"{tmp_path / 'a.csv'}:2"


def test_truncated_gzip_is_counted_not_raised(tmp_path):
    data = gzip.compress(("\n".join(json.dumps({"text": f"row {i}"}) for i in range(2000))).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    docs, ledger = _read(tmp_path)
    assert len(docs) > 0 and ledger.drops["unreadable_file"] == 1


def test_symlink_loops_end(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "doc.txt").write_text("hello", encoding="utf-8")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")
    os.symlink(tmp_path, tmp_path / "a" / "up")
    os.symlink(tmp_path / "missing", tmp_path / "a" / "dangling.txt")
    readable, ignored = walk(tmp_path)
    assert [p.name for p in readable] == ["doc.txt"] and [p.name for p in ignored] == ["dangling.txt"]


def test_empty_folder_and_unreadable_file_stop_before_work(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CptkitError, match="holds no files"):
        plan_source(tmp_path / "empty", "text", "data.sources[0]")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(CptkitError, match="none readable"):
        plan_source(tmp_path / "other", "text", "data.sources[0]")
    with pytest.raises(CptkitError, match="unreadable extension"):
        plan_source(tmp_path / "other" / "x.pdf", "text", "data.sources[0]")


def test_one_line_file_of_many_megabytes_is_one_document(tmp_path):
    line = "word " * ((3 << 20) // 5)  # 3 MB on one line
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": line}) + "\n", encoding="utf-8")
    docs, _ = _read(tmp_path / "big.jsonl")
    assert len(docs) == 1 and len(docs[0].text) == len(line)


def test_json_object_file_and_csv_with_bad_bytes(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps({"text": "a single object"}, indent=2), encoding="utf-8")
    (tmp_path / "bad.csv").write_bytes(b"text\ncaf\xe9 row\nfine row\n")
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as f:  # a bad first line must not swallow the file
        f.write('{"text": broken\n' + json.dumps({"text": "second line"}) + "\n")
    docs, ledger = _read(tmp_path)
    assert [d.text for d in docs] == ["caf\ufffd row", "fine row", "a single object", "second line"]
    assert ledger.repairs == {"encoding_errors": 1} and ledger.examples["encoding_errors"].startswith(
        f"{tmp_path / 'bad.csv'}:2"
    )
    assert ledger.drops == {"malformed_json": 1}


@pytest.mark.parametrize("chunk_chars", [1, 2, 3, 7, 64, 1 << 20])
def test_json_array_streams_element_by_element(chunk_chars):
    """Whatever the chunk size, the stream gives the elements json.loads gives: strings holding
    brackets and commas, nested values, numbers cut by a chunk boundary, escapes, whitespace."""
    import io

    from cptkit.data.json_array import iter_json_array

    rows = [
        {"text": "a ], b [, c", "n": 12345678},
        {"text": 'line\nbreak "quoted" \\ and \u00e9', "nested": {"list": [1, [2, 3], {"k": []}]}},
        12345,
        -0.5e-3,
        "plain string",
        [],
        {},
        None,
        True,
    ]
    text = json.dumps(rows, indent=2)
    assert list(iter_json_array(io.StringIO(text), chunk_chars)) == json.loads(text)
    assert list(iter_json_array(io.StringIO(" [ ] "), chunk_chars)) == []
    assert list(iter_json_array(io.StringIO("[1,22,333]"), chunk_chars)) == [1, 22, 333]


@pytest.mark.parametrize(
    ("text", "kept", "error"),
    [
        ('[{"text": "a"}, {"text": "b"} {"text": "c"}]', 2, "expected ',' or ']'"),
        ('[{"text": "a"}, {"text": "b', 1, "element 1"),
        ('[{"text": "a"},', 1, "ends inside the array"),
        ('{"text": "a"}', 0, "not a JSON array"),
    ],
)
def test_json_array_errors_keep_what_came_before(text, kept, error):
    import io

    from cptkit.data.json_array import iter_json_array

    got = []
    with pytest.raises(ValueError, match=error):
        for value in iter_json_array(io.StringIO(text), chunk_chars=4):
            got.append(value)
    assert len(got) == kept


def test_json_array_file_is_streamed_and_a_broken_tail_is_counted(tmp_path):
    rows = [{"text": f"row {i} " + "x" * 1000} for i in range(3000)]  # ~3 MB: several read chunks
    (tmp_path / "big.json").write_text(json.dumps(rows), encoding="utf-8")
    docs, ledger = _read(tmp_path / "big.json")
    assert [d.text for d in docs] == [r["text"] for r in rows]
    assert docs[7].where == f"{tmp_path / 'big.json'}[7]"

    (tmp_path / "cut.json").write_bytes(b'[{"text": "kept"}, {"text": "caf\xe9"}, {"text": "cut off')
    docs, ledger = _read(tmp_path / "cut.json")
    assert [d.text for d in docs] == ["kept", "caf\ufffd"]
    assert ledger.drops == {"malformed_json": 1}
    assert ledger.examples["malformed_json"].startswith(f"{tmp_path / 'cut.json'}[2]")
    assert ledger.repairs == {"encoding_errors": 1}


def _rows_bytes(n: int) -> bytes:
    return ("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(n))).encode()


def test_truncated_zstd_keeps_the_rows_before_and_names_the_file(tmp_path):
    import zstandard

    data = zstandard.ZstdCompressor().compress(_rows_bytes(20000))
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])
    (tmp_path / "whole.jsonl.zst").write_bytes(data)
    frames = zstandard.ZstdCompressor().compress(b"first frame. ") + zstandard.ZstdCompressor().compress(
        b"second"
    )
    (tmp_path / "frames.txt.zst").write_bytes(frames)
    docs, ledger = _read(tmp_path)
    cut = [d for d in docs if "cut.jsonl.zst" in d.where]
    assert 0 < len(cut) < 20000 and [d.text for d in cut] == [f"row {i}" for i in range(len(cut))]
    assert sum("whole.jsonl.zst" in d.where for d in docs) == 20000
    assert [d.text for d in docs if "frames" in d.where] == ["first frame. second"]
    assert ledger.drops == {"unreadable_file": 1}
    assert ledger.examples["unreadable_file"].startswith(f"{tmp_path / 'cut.jsonl.zst'} (EOFError: ")
    assert "truncated" in ledger.examples["unreadable_file"]


def test_truncated_zstd_text_file_is_counted(tmp_path):
    import zstandard

    data = zstandard.ZstdCompressor().compress(b"a whole document " * 5000)
    (tmp_path / "cut.md.zst").write_bytes(data[:-3])
    docs, ledger = _read(tmp_path)
    assert docs == [] and ledger.drops == {"unreadable_file": 1}
    assert str(tmp_path / "cut.md.zst") in ledger.examples["unreadable_file"]


@pytest.mark.parametrize("name", ["corrupt.jsonl.zst", "notzstd.txt.zst", "corrupt.jsonl.gz"])
def test_corrupt_archives_are_counted_and_the_run_goes_on(tmp_path, name):
    import zstandard

    rows = _rows_bytes(2000)
    if name == "notzstd.txt.zst":
        blob = b"plain bytes, no zstd frame"
    elif name.endswith(".zst"):
        whole = zstandard.ZstdCompressor().compress(rows)
        blob = whole[:20] + b"\xff" * 50 + whole[70:]
    else:
        whole = gzip.compress(rows)
        blob = whole[:200] + bytes(range(256)) * 4 + whole[1224:]
    (tmp_path / name).write_bytes(blob)
    (tmp_path / "good.txt").write_text("a good document", encoding="utf-8")
    docs, ledger = _read(tmp_path)
    assert [d.text for d in docs if d.where.endswith("good.txt")] == ["a good document"]
    assert ledger.drops == {"unreadable_file": 1}
    assert ledger.examples["unreadable_file"].startswith(f"{tmp_path / name} (")
    assert "corrupt" in ledger.examples["unreadable_file"]


def test_utf16_and_utf32_text_is_read_by_its_byte_order_mark(tmp_path):
    (tmp_path / "le.txt").write_bytes(
        "h\u00e9llo, UTF-16 LE".encode("utf-16-le").join([codecs.BOM_UTF16_LE, b""])
    )
    (tmp_path / "be.md").write_bytes(codecs.BOM_UTF16_BE + "big endian \u4e2d\u6587".encode("utf-16-be"))
    (tmp_path / "wide.rst").write_bytes("thirty-two bits".encode("utf-32"))
    (tmp_path / "rows.jsonl").write_bytes('{"text": "caf\u00e9"}\n\n{"text": "second"}\n'.encode("utf-16"))
    (tmp_path / "table.csv").write_bytes('id,text\n1,"x, y"\n2,z\n'.encode("utf-16"))
    (tmp_path / "array.json").write_bytes(json.dumps([{"text": "in an array"}]).encode("utf-16"))
    with gzip.open(tmp_path / "packed.txt.gz", "wb") as f:
        f.write("compressed UTF-16".encode("utf-16"))
    docs, ledger = _read(tmp_path)
    assert sorted(d.text for d in docs) == sorted(
        [
            "h\u00e9llo, UTF-16 LE",
            "big endian \u4e2d\u6587",
            "thirty-two bits",
            "caf\u00e9",
            "second",
            "x, y",
            "z",
            "in an array",
            "compressed UTF-16",
        ]
    )
    assert not ledger.drops and not ledger.repairs
    assert {d.where for d in docs if d.text == "second"} == {f"{tmp_path / 'rows.jsonl'}:3"}


def test_undecodable_utf16_units_are_replaced_and_counted(tmp_path):
    lone_surrogate = b"\x00\xd8"
    (tmp_path / "bad.txt").write_bytes("ok ".encode("utf-16") + lone_surrogate + "tail".encode("utf-16-le"))
    docs, ledger = _read(tmp_path)
    assert [d.text for d in docs] == ["ok \ufffdtail"]
    assert ledger.repairs == {"encoding_errors": 1} and not ledger.drops


def test_a_file_that_cannot_be_read_has_no_hash_and_is_counted_when_read(tmp_path):
    from cptkit.data.hashing import hash_files

    bad = tmp_path / "locked.txt"
    if not make_unreadable(bad):
        pytest.skip("no unreadable kind of file here")
    (tmp_path / "fine.txt").write_text("fine", encoding="utf-8")
    sha = hash_files([bad, tmp_path / "fine.txt"], tmp_path / ".cache" / "hashes.json")
    assert sha[bad] is None and len(sha[tmp_path / "fine.txt"]) == 64
    docs, ledger = _read(tmp_path)
    assert [d.text for d in docs] == ["fine"]
    assert ledger.drops == {"unreadable_file": 1}
    assert ledger.examples["unreadable_file"].startswith(f"{bad} (")

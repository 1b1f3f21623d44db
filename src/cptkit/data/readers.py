"""Readers: a source path -> the files it holds -> a stream of `Document`s.

A folder is walked recursively (symlinks followed, each real folder visited once, so loops end);
.txt/.md/.rst files are one document each, .jsonl/.json/.parquet/.csv files one document per row,
all optionally .gz/.zst compressed (UTF-8, or UTF-16/32 with a byte order mark); a folder written by
`datasets.save_to_disk` is read as a dataset. A file cut short or damaged keeps the rows read before
the damage and is counted as `unreadable_file`, named.
Files are read as streams: only one document (one file, or one row) is in memory at a time. A hub
source (`type: hub`) is planned and read by `cptkit.data.hub`; its plan is a `SourcePlan` too.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cptkit.data.document import CountingDecode, Document, Ledger, decode
from cptkit.data.hashing import file_size
from cptkit.data.streams import READ_ERRORS, Progress, describe_error, open_binary, open_text_bytes
from cptkit.errors import CptkitError

if TYPE_CHECKING:
    from cptkit.data.hub import HubPlan

log = logging.getLogger(__name__)

TEXT_FORMATS = (".txt", ".md", ".rst")
ROW_FORMATS = (".jsonl", ".json", ".parquet", ".csv")
COMPRESSIONS = (".gz", ".zst")
_SNIFF_BYTES = 8192


def file_format(path: Path) -> tuple[str, str] | None:
    """(format, compression) of a readable file, e.g. ('.jsonl', '.gz'); None when not readable."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = ""
    if suffixes and suffixes[-1] in COMPRESSIONS:
        compression = suffixes.pop()
    if suffixes and suffixes[-1] in TEXT_FORMATS + ROW_FORMATS:
        return suffixes[-1], compression
    return None


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


@dataclass
class SourcePlan:
    """What a source holds, found before any work: readable files, a saved dataset, or a hub dataset's
    stream (`hub`; `files` are then its data files where they are on this machine, else none)."""

    files: list[Path]
    dataset: Path | None = None
    ignored: list[Path] | None = None
    hub: HubPlan | None = None


def plan_source(path: str | Path, text_field: str, label: str) -> SourcePlan:
    """List the readable inputs of a source, or raise a clear error if there is nothing to read."""
    root = Path(path)
    if is_saved_dataset(root):
        _open_saved_dataset(root, text_field, label)  # fail now, not after other sources' work
        return SourcePlan(files=sorted(p for p in root.rglob("*") if p.is_file()), dataset=root)
    if root.is_file():
        if file_format(root) is None:
            raise CptkitError(
                f"{label}: {root} has an unreadable extension (expected .txt .md .rst .jsonl .json .parquet "
                ".csv, optionally .gz or .zst)"
            )
        return SourcePlan(files=[root])
    files, ignored = walk(root)
    if not files:
        what = f"{len(ignored)} file(s), none readable (e.g. {ignored[0]})" if ignored else "no files"
        raise CptkitError(
            f"{label}: {root} holds {what}; expected .txt .md .rst .jsonl .json .parquet .csv files "
            "(optionally .gz/.zst) or a saved HF dataset"
        )
    if ignored:
        log.warning("%s: ignoring %d file(s) with other extensions, e.g. %s", label, len(ignored), ignored[0])
    return SourcePlan(files=files, ignored=ignored)


def walk(root: Path) -> tuple[list[Path], list[Path]]:
    """Readable and ignored files under `root`, sorted; hidden entries skipped; symlink loops visited once."""
    readable, ignored = [], []
    seen = {os.path.realpath(root)}
    for folder, dirs, names in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(folder, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if not path.is_file():  # a dangling symlink
                ignored.append(path)
            elif file_format(path) is None:
                ignored.append(path)
            else:
                readable.append(path)
    return sorted(readable), sorted(ignored)


def read_documents(
    plan: SourcePlan, files: list[Path], text_field: str, ledger: Ledger, progress: Progress | None = None
) -> Iterator[Document]:
    """Every document of `files` (a subset of the plan's), dropped rows recorded in `ledger`;
    `progress(n)` is told of every n bytes read from disk."""
    if plan.dataset is not None:
        yield from _read_saved_dataset(plan.dataset, text_field, ledger)
        return
    for path in files:
        fmt, compression = file_format(path)
        try:
            if fmt in TEXT_FORMATS:
                yield from _read_text_file(path, compression, ledger, progress)
            elif fmt == ".parquet":
                yield from _read_parquet(path, compression, text_field, ledger, progress)
            elif fmt == ".csv":
                yield from _read_csv(path, compression, text_field, ledger, progress)
            else:
                yield from _read_json_lines(path, compression, text_field, ledger, progress)
        except (*READ_ERRORS, ValueError) as e:  # a cut or corrupt archive, a corrupt parquet file, ...
            if isinstance(e, UnicodeError):
                raise
            ledger.drop("unreadable_file", f"{path} ({describe_error(e)})")
            log.warning("unreadable_file: %s (%s); the rows read before it are kept", path, describe_error(e))


def _is_binary(head: bytes) -> bool:
    return b"\x00" in head


def _read_text_file(
    path: Path, compression: str, ledger: Ledger, progress: Progress | None
) -> Iterator[Document]:
    with open_text_bytes(path, compression, progress) as f:
        data = f.read()
    if _is_binary(data[: _SNIFF_BYTES * 8]):
        ledger.drop("binary_file", str(path))
        return
    text, errors = decode(data)
    del data
    if errors:
        ledger.repair("encoding_errors", f"{path} ({errors} undecodable bytes replaced)")
    yield Document(text, str(path))


def _row_text(row: object, text_field: str, where: str, ledger: Ledger) -> str | None:
    if not isinstance(row, dict):
        ledger.drop("row_not_an_object", where)
        return None
    value = row.get(text_field)
    if value is None:
        ledger.drop("no_text_field", where)
        return None
    if not isinstance(value, str):
        ledger.drop("text_not_a_string", where)
        return None
    return value


def _read_json_lines(
    path: Path, compression: str, text_field: str, ledger: Ledger, progress: Progress | None
) -> Iterator[Document]:
    with open_text_bytes(path, compression, progress) as f:
        head = f.peek(_SNIFF_BYTES)[:_SNIFF_BYTES] if hasattr(f, "peek") else b""
        if _is_binary(head):
            ledger.drop("binary_file", str(path))
            return
        if head.lstrip()[:1] == b"[":  # a JSON array: streamed element by element
            yield from _read_json_array(f, path, text_field, ledger)
            return
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            text, errors = decode(line)
            if errors:
                ledger.repair("encoding_errors", f"{where} ({errors} undecodable bytes replaced)")
            try:
                row = json.loads(text)
            except ValueError:
                if number == 1 and file_format(path)[0] == ".json" and text.lstrip().startswith("{"):
                    yield from _read_json_document(path, compression, text_field, ledger)
                    return
                ledger.drop("malformed_json", where)
                continue
            value = _row_text(row, text_field, where, ledger)
            if value is not None:
                yield Document(value, where)


def _read_json_array(f: io.BufferedIOBase, path: Path, text_field: str, ledger: Ledger) -> Iterator[Document]:
    """A .json file holding an array of rows, streamed element by element."""
    from cptkit.data.json_array import iter_json_array

    counted = CountingDecode(f)
    stream = io.TextIOWrapper(counted, encoding="utf-8-sig", errors="replace")
    parsed = [0]  # rows parsed so far: the index of the one an error is in

    def rows() -> Iterator[tuple[object, str]]:
        for index, row in enumerate(iter_json_array(stream)):
            parsed[0] = index + 1
            yield row, f"{path}[{index}]"

    try:
        yield from _documents(rows(), counted, text_field, ledger)
    except ValueError as e:  # the rows before the error are kept; the rest of the file cannot be read
        ledger.drop("malformed_json", f"{path}[{parsed[0]}] ({e}); the rest of the file is skipped")


def _documents(
    rows: Iterator[tuple[object, str]], counted: CountingDecode, text_field: str, ledger: Ledger
) -> Iterator[Document]:
    """(row, where) pairs as Documents; bytes `counted` replaced since the previous row are recorded
    at the row they were met in."""
    errors = 0
    for row, where in rows:
        if counted.errors != errors:
            ledger.repair(
                "encoding_errors", f"{where} ({counted.errors - errors} undecodable bytes replaced)"
            )
            errors = counted.errors
        value = _row_text(row, text_field, where, ledger)
        if value is not None:
            yield Document(value, where)


def _read_json_document(path: Path, compression: str, text_field: str, ledger: Ledger) -> Iterator[Document]:
    """A .json file holding one (pretty-printed) object: one row."""
    with open_text_bytes(path, compression) as f:
        text, _ = decode(f.read())
    try:
        row = json.loads(text)
    except ValueError:
        ledger.drop("malformed_json", f"{path}:1")
        return
    value = _row_text(row, text_field, str(path), ledger)
    if value is not None:
        yield Document(value, str(path))


def _read_csv(
    path: Path, compression: str, text_field: str, ledger: Ledger, progress: Progress | None
) -> Iterator[Document]:
    csv.field_size_limit(sys.maxsize)
    with open_text_bytes(path, compression, progress) as raw:
        if _is_binary(raw.peek(_SNIFF_BYTES)[:_SNIFF_BYTES] if hasattr(raw, "peek") else b""):
            ledger.drop("binary_file", str(path))
            return
        counted = CountingDecode(raw)
        stream = io.TextIOWrapper(counted, encoding="utf-8-sig", errors="replace", newline="")
        reader = csv.DictReader(stream)
        try:
            yield from _documents(
                ((row, f"{path}:{reader.line_num}") for row in reader), counted, text_field, ledger
            )
        except csv.Error as e:
            ledger.drop("malformed_csv", f"{path}:{reader.line_num} ({e})")


def _read_parquet(
    path: Path, compression: str, text_field: str, ledger: Ledger, progress: Progress | None
) -> Iterator[Document]:
    import pyarrow.parquet as pq

    if compression:  # parquet needs random access: a compressed one is read whole
        with open_binary(path, compression, progress) as f:
            pf = pq.ParquetFile(io.BytesIO(f.read()))
    else:
        pf = pq.ParquetFile(path)
        if progress is not None:
            progress(file_size(path))
    if text_field not in pf.schema_arrow.names:
        ledger.drop(
            "no_text_field", f"{path} (columns: {', '.join(pf.schema_arrow.names)})", pf.metadata.num_rows
        )
        return
    number = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            number += 1
            if isinstance(value, str):
                yield Document(value, f"{path}:{number}")
            else:
                ledger.drop("no_text_field" if value is None else "text_not_a_string", f"{path}:{number}")


def _open_saved_dataset(path: Path, text_field: str, label: str):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a damaged folder
        raise CptkitError(f"{label}: {path} looks like a saved dataset but cannot be loaded: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise CptkitError(
                f"{label}: {path} is a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                f"point the path at one split's folder, e.g. {path / next(iter(ds))}"
            )
        ds = ds["train"]
    if text_field not in ds.column_names:
        raise CptkitError(
            f"{label}.text_field: {text_field!r} is not a column of {path} (columns: {', '.join(ds.column_names)})"
        )
    return ds


def _read_saved_dataset(path: Path, text_field: str, ledger: Ledger) -> Iterator[Document]:
    ds = _open_saved_dataset(path, text_field, str(path)).select_columns([text_field])
    number = 0
    for batch in ds.iter(batch_size=1000):
        for value in batch[text_field]:
            number += 1
            if isinstance(value, str):
                yield Document(value, f"{path}:{number}")
            else:
                ledger.drop("no_text_field" if value is None else "text_not_a_string", f"{path}:{number}")

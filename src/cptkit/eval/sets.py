"""Evaluation sets: the held-out documents `cptkit prepare` set aside, and any extra text files.

Each set keeps the raw text and its UTF-8 byte counts, so that every model can be scored with its own
tokenizer and models with different tokenizers compare by bits per byte. The token ids prepare stored
are reused when the model's tokenizer is the one they were made with (same fingerprint).
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cptkit.errors import CptkitError

if TYPE_CHECKING:
    from cptkit.data.prepared import Prepared

log = logging.getLogger(__name__)

_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


@dataclass
class EvalSet:
    name: str
    role: str  # domain or general
    texts: list[str]
    num_bytes: list[int]
    input_ids: list[list[int]] | None = None  # as prepared, with the tokenizer of `fingerprint`
    fingerprint: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.num_bytes)


def heldout_sets(prepared: Prepared, max_documents: int | None = None) -> list[EvalSet]:
    """Every held-out set of a prepared dataset (`Prepared.load` has checked that each is on disk)."""
    sets = []
    for name, info in prepared.heldout.items():
        ds = prepared.heldout_set(name)
        if max_documents is not None:
            ds = ds.select(range(min(max_documents, len(ds))))
        texts = list(ds["text"])
        nbytes = list(ds["num_bytes"]) if "num_bytes" in ds.column_names else [len(t.encode()) for t in texts]
        ids = [list(x) for x in ds["input_ids"]] if "input_ids" in ds.column_names else None
        sets.append(EvalSet(name, info.role, texts, nbytes, ids, prepared.fingerprint))
    if not sets:
        log.warning(
            "%s: the prepared dataset has no held-out sets (data.heldout_fraction 0?)", prepared.folder
        )
    return sets


def text_set(
    name: str,
    path: str | Path,
    role: str = "domain",
    text_field: str = "text",
    max_documents: int | None = None,
) -> EvalSet:
    """A set read from a text file (one document), a .jsonl/.json file (one per record) or a folder of them."""
    path = Path(path)
    if not path.exists():
        raise CptkitError(f"eval.extra_texts {name}: {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    texts: list[str] = []
    for f in files:
        texts += _read_texts(f, text_field)
    texts = [t for t in texts if t.strip()][:max_documents]
    if not texts:
        raise CptkitError(
            f"eval.extra_texts {name}: no text found in {path} (field {text_field!r} for JSON lines)"
        )
    return EvalSet(name, role, texts, [len(t.encode("utf-8")) for t in texts])


def _read_texts(path: Path, field: str) -> list[str]:
    suffixes = [s.lower() for s in path.suffixes]
    opener = gzip.open if suffixes[-1:] == [".gz"] else open
    kind = (
        suffixes[-2] if suffixes[-1:] == [".gz"] and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    )
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        if kind == ".jsonl":
            return [str(json.loads(line).get(field, "")) for line in f if line.strip()]
        if kind == ".json":
            data = json.load(f)
            rows = data if isinstance(data, list) else [data]
            return [str(r.get(field, "")) if isinstance(r, dict) else str(r) for r in rows]
        if kind in _TEXT_SUFFIXES or not kind:
            return [f.read()]
    log.warning("skipping %s: not .txt/.md/.rst/.jsonl/.json", path)
    return []


def token_docs(eval_set: EvalSet, tokenizer) -> list[list[int]]:
    """The set's documents as this tokenizer's ids: BOS as the tokenizer adds it, EOS at the end."""
    from cptkit.data.manifest import tokenizer_fingerprint

    if eval_set.input_ids is not None and eval_set.fingerprint == tokenizer_fingerprint(tokenizer):
        return eval_set.input_ids
    eos = tokenizer.eos_token_id
    docs = []
    for ids in tokenizer(eval_set.texts, add_special_tokens=True)["input_ids"]:
        docs.append(list(ids) + ([eos] if eos is not None and (not ids or ids[-1] != eos) else []))
    return docs

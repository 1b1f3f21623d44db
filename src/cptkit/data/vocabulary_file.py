"""What a prepared folder records of a vocabulary extension (`data.vocabulary`), for train and merge.

A prepared folder whose tokenizer was extended holds, beside `manifest.json`:
- `tokenizer/`: the extended tokenizer, as `save_pretrained` writes it (`AutoTokenizer.from_pretrained`
  loads it; its ids below `base_size` are the base tokenizer's, unchanged);
- `vocabulary.json`: this file's `Vocabulary`: the base tokenizer, the extended one's size and
  fingerprint, and each new token with its id, its vocabulary string, its text, the ids of the base
  pieces it replaces (what train initialises its rows from), how often it occurred in the sample and how
  many base tokens it saved there; the settings it was learnt with, and fertility before and after.
The manifest's `tokenizer` entry is the extended tokenizer's; its `vocabulary` entry summarises this file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cptkit.errors import CptkitError

VOCABULARY = "vocabulary.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = 1


@dataclass(frozen=True)
class NewToken:
    """One added token: its id, its string in the BPE vocabulary (byte-level form, e.g. 'Ġhypertension'),
    its text (' hypertension'), the base ids it replaces (in order), its count and base tokens saved."""

    id: int
    token: str
    text: str
    pieces: tuple[int, ...]
    count: int
    saved: int


@dataclass
class Vocabulary:
    base_name: str  # the base tokenizer's name or path (data.tokenizer)
    base_fingerprint: str
    base_size: int  # len(base tokenizer): every id below it is the base's
    size: int  # len(extended tokenizer)
    fingerprint: str  # the extended tokenizer's (the manifest's tokenizer fingerprint)
    tokens: list[NewToken]
    settings: dict[str, Any] = field(default_factory=dict)  # data.vocabulary as it was learnt with
    sample: dict[str, Any] = field(default_factory=dict)  # {sources, documents, characters}
    fertility: dict[str, Any] = field(default_factory=dict)  # source -> {before, after} tokens/1k chars

    @property
    def new_ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens"] = [asdict(t) | {"pieces": list(t.pieces)} for t in self.tokens]
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocabulary:
        d = {k: v for k, v in d.items() if k != "format"}
        tokens = [NewToken(**(t | {"pieces": tuple(t["pieces"])})) for t in d.pop("tokens")]
        return cls(tokens=tokens, **d)


def write_vocabulary(folder: Path, vocabulary: Vocabulary) -> Path:
    path = Path(folder) / VOCABULARY
    path.write_text(json.dumps(vocabulary.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def read_vocabulary(folder: Path) -> Vocabulary | None:
    """The folder's vocabulary extension; None where its tokenizer was not extended."""
    path = Path(folder) / VOCABULARY
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CptkitError(f"{path}: not readable ({e}); run `cptkit prepare --force`") from e
    if raw.get("format") != FORMAT:
        raise CptkitError(
            f"{path}: vocabulary format {raw.get('format')}, this cptkit reads {FORMAT}; run `cptkit prepare --force`"
        )
    return Vocabulary.from_dict(raw)

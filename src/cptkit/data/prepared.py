"""A folder written by `cptkit prepare`, read back: the one typed view every later stage uses.

`Prepared.load(folder)` checks that the folder is a finished preparation (its manifest says `complete`,
of the format this cptkit reads; the training rows' index, every store file it lists (made with the
index's tokenizer, holding the tokens it lists) and every listed held-out set are on disk) and says what
to run when it is not. Train, eval, merge and report read the manifest only through this class: the
layout is in `cptkit.data.manifest`, the store's in `cptkit.data.store`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cptkit.data.manifest import FORMAT_VERSION, MANIFEST, read_manifest
from cptkit.data.vocabulary_file import TOKENIZER_DIR, Vocabulary, read_vocabulary
from cptkit.errors import CptkitError

if TYPE_CHECKING:  # numpy, pyarrow and torch load when a store is opened, not with every command
    from cptkit.data.store import TokenSpace, TrainIndex
    from cptkit.data.view import PackedRows

# what a per-source feature says (once) when the rows were prepared before they carried source ids
NO_SOURCE_IDS = "the prepared rows carry no source ids; run `cptkit prepare` again to get per-source losses"


@dataclass(frozen=True)
class HeldoutInfo:
    """One held-out set as the manifest lists it: `dir` is relative to the prepared folder."""

    name: str
    dir: str
    role: str
    documents: int
    tokens: int
    bytes: int


@dataclass
class Prepared:
    """A finished prepared dataset: its folder and its manifest, with typed accessors."""

    folder: Path
    manifest: dict[str, Any]
    _index: TrainIndex | None = field(default=None, repr=False, compare=False)
    _space: TokenSpace | None = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, folder: str | Path) -> Prepared:
        """The prepared dataset in `folder`, or a CptkitError that says what is wrong and what to run.
        The token store is opened (memory-mapped, no token read) and checked here, before any model
        loads: its format, its files and the tokenizer they were made with."""
        from cptkit.data.store import format_refusal

        folder = Path(folder)
        prepared = cls(folder, read_manifest(folder))
        if prepared.manifest.get("format_version") != FORMAT_VERSION:
            raise format_refusal(folder, prepared.manifest.get("format_version"), FORMAT_VERSION)
        missing = [h.dir for h in prepared.heldout.values() if not (folder / h.dir).is_dir()]
        if not (folder / prepared.train_dir).is_dir():
            missing.insert(0, prepared.train_dir)
        if missing:
            raise CptkitError(
                f"{folder}: {', '.join(missing)} listed in {MANIFEST} but missing on disk; rerun "
                "`cptkit prepare --force` (or remove the folder and prepare again)"
            )
        prepared._open_store()
        return prepared

    def _open_store(self) -> None:
        """The rows' index and the store files it lists, checked (see `cptkit.data.store`)."""
        from cptkit.data.store import TokenSpace, TrainIndex

        if self._space is not None:
            return
        index = TrainIndex(self.folder, self.train_dir)
        if self.fingerprint and index.fingerprint != self.fingerprint:
            raise CptkitError(
                f"{index.dir}: the store was tokenized with fingerprint {index.fingerprint}, but {MANIFEST} "
                f"names {self.fingerprint}: the folder mixes two preparations; run `cptkit prepare --force`"
            )
        self._index, self._space = index, TokenSpace(self.folder, index.shards, index.fingerprint)

    @classmethod
    def read(cls, folder: str | Path) -> Prepared:
        """The manifest of a finished preparation whose data may be gone (its rows deleted after
        training to free the disk): enough for `cptkit inspect` and the report, not for training."""
        folder = Path(folder)
        return cls(folder, read_manifest(folder))

    # --- what the manifest records ---
    @property
    def seq_length(self) -> int:
        return int(self.manifest["seq_length"])

    @property
    def chunking(self) -> str:
        return self.manifest.get("chunking", "packing")

    @property
    def train_dir(self) -> str:
        return self.manifest.get("train_dir", "train")

    @property
    def tokenizer(self) -> dict[str, Any]:
        """name_or_path, fingerprint, vocab_size and the special token ids it was made with."""
        return self.manifest.get("tokenizer") or {}

    @property
    def vocabulary(self) -> Vocabulary | None:
        """The vocabulary extension its tokenizer was made with (`vocabulary.json`); None: not extended."""
        return read_vocabulary(self.folder)

    @property
    def tokenizer_dir(self) -> Path | None:
        """The extended tokenizer saved with the data (`tokenizer/`); None: the data uses `data.tokenizer`."""
        folder = self.folder / TOKENIZER_DIR
        return folder if folder.is_dir() else None

    @property
    def fingerprint(self) -> str | None:
        return self.tokenizer.get("fingerprint")

    @property
    def store_fingerprint(self) -> str:
        """The fingerprint of the tokenizer the store's ids were made with (train/index.json's, which
        `load` checked every store file against): what the model's tokenizer must match."""
        self._open_store()
        return self._index.fingerprint

    @property
    def sources(self) -> dict[str, dict[str, Any]]:
        """Per source: role, weight, documents, tokens, drops, duplicates, held-out and mixed tokens, ..."""
        return self.manifest.get("sources") or {}

    @property
    def totals(self) -> dict[str, Any]:
        return self.manifest.get("totals") or {}

    @property
    def heldout(self) -> dict[str, HeldoutInfo]:
        """Held-out sets by name, sorted by name. A set with no documents (a source whose held-out
        fraction is 0) is left out: there is nothing to score on it."""
        out = {}
        for name, info in sorted((self.manifest.get("heldout") or {}).items()):
            if not info.get("documents", 0):
                continue
            role = info.get("role") or self.sources.get(name, {}).get("role", "domain")
            out[name] = HeldoutInfo(
                name=name,
                dir=info.get("dir", f"heldout/{name}"),
                role=role,
                documents=int(info.get("documents", 0)),
                tokens=int(info.get("tokens", 0)),
                bytes=int(info.get("bytes", 0)),
            )
        return out

    @property
    def source_index(self) -> dict[str, int]:
        """Source name -> the id its tokens carry in the rows' `source_ids` (every source, config order,
        0..n-1; held-out-only ones too). Empty for a folder prepared before source ids existed."""
        return {name: int(i) for name, i in (self.manifest.get("source_index") or {}).items()}

    @property
    def general_source_ids(self) -> frozenset[int]:
        """The ids of the sources whose role is general (replay: what the model should not forget)."""
        return frozenset(
            i for name, i in self.source_index.items() if self.sources.get(name, {}).get("role") == "general"
        )

    @property
    def general_training_sources(self) -> list[str]:
        """The general (replay) sources with tokens in the training rows: what kl_to_base's replay tokens
        and EWC's Fisher come from."""
        return [n for n, s in self.sources.items() if s.get("role") == "general" and s.get("mixed_tokens")]

    @property
    def has_source_ids(self) -> bool:
        """Whether the training rows carry `source_ids` (else per-source features say NO_SOURCE_IDS)."""
        return bool(self.source_index)

    @cached_property
    def manifest_hash(self) -> str:
        """sha256 of manifest.json: names exactly which data a run trained on."""
        return hashlib.sha256((self.folder / MANIFEST).read_bytes()).hexdigest()[:16]

    # --- the data ---
    def train_rows(self) -> PackedRows:
        """The training rows, read from the token store as they are asked for (`PackedRows`: input_ids,
        position_ids and source_ids, one per segment)."""
        from cptkit.data.view import PackedRows

        self._open_store()
        if self._index.rows == 0:
            raise CptkitError(
                f"{self.folder}: the prepared dataset has no training rows; add data and prepare again"
            )
        return PackedRows(self.folder, self.train_dir, self._index, self._space)

    def heldout_set(self, name: str) -> Any:
        """One held-out set (`datasets.Dataset` of text, input_ids, num_bytes), memory-mapped."""
        from datasets import load_from_disk

        return load_from_disk(str(self.folder / self.heldout[name].dir))

    def heldout_sets(self) -> dict[str, Any]:
        """Every held-out set by name (sorted), each a memory-mapped `datasets.Dataset`."""
        return {name: self.heldout_set(name) for name in self.heldout}

    def to_json(self) -> str:
        return json.dumps(self.manifest, indent=2, ensure_ascii=False)

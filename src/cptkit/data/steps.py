"""The two shapes of a data step, and the runners that count what each one drops.

A document step (normalise, each filter) is a function of one document's text: it returns the text,
possibly changed, or `Drop(reason)`. `run_steps` passes documents through the steps in order and
counts every drop by its reason (with its first example) in the Ledger, so a new filter is one
function that never counts anything itself.

A corpus step (exact dedup, near dedup, the held-out split) sees a whole source at a time: it gets the
source's documents and the indices still in play, and returns the subset it selects (kept, or held
out). Sources go through it in config order, so a step may remember earlier sources (dedup does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from cptkit.data.document import Document, Ledger


@dataclass(frozen=True, slots=True)
class Drop:
    """A document step's verdict that the document goes; `reason` is a short snake_case name."""

    reason: str


DocumentStep = Callable[[str], "str | Drop"]


def apply_steps(steps: Sequence[DocumentStep], text: str) -> str | Drop:
    """The text after every step, or the first step's drop."""
    for step in steps:
        out = step(text)
        if isinstance(out, Drop):
            return out
        text = out
    return text


def run_steps(steps: Sequence[DocumentStep], docs: Iterable[Document], ledger: Ledger) -> Iterator[Document]:
    """Each document through `steps`; a dropped one is counted in `ledger` under its reason."""
    for doc in docs:
        out = apply_steps(steps, doc.text)
        if isinstance(out, Drop):
            ledger.drop(out.reason, doc.where)
        else:
            yield Document(out, doc.where)


@dataclass
class SourceDocs:
    """One source's tokenized documents (a cached Arrow table: hash, text, input_ids, ...) as corpus
    steps see them."""

    name: str
    config: Any  # its SourceConfig
    table: Any  # pyarrow.Table

    @property
    def num_documents(self) -> int:
        return self.table.num_rows

    @cached_property
    def hashes(self) -> list[bytes]:
        """128-bit hash of each document's normalised text."""
        return self.table.column("hash").to_pylist()


class CorpusStep(Protocol):
    """A step over a whole source: the subset (ascending indices) of `docs` it selects."""

    def select(self, source: SourceDocs, docs: np.ndarray) -> np.ndarray: ...

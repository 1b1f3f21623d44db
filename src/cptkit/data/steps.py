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
from dataclasses import dataclass, field
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
    """One source's tokenized documents (its store shards as one memory-mapped Arrow table: hash, text,
    input_ids, ...) as corpus steps see them."""

    name: str
    config: Any  # its SourceConfig
    table: Any  # pyarrow.Table
    shards: list[Any] = field(default_factory=list)  # its StoreShards, in order (the table's pieces)

    def take(self, column: str, rows: np.ndarray) -> Any:
        """Rows `rows` of `column` (a new pyarrow array, in the order asked), read through a mapping of each
        shard file that is closed again once its rows are copied: the pages a read maps (a whole page
        cache folio, often hundreds of KB, for each document) leave the process with the mapping, so
        reading a few documents of every shard, or every document's text once, never holds the store."""
        from cptkit.data.columns import take_rows

        rows = np.asarray(rows, dtype=np.int64)
        if not self.shards:
            return take_rows(self.table.column(column), rows)
        import pyarrow as pa

        wanted, where = np.unique(rows, return_inverse=True)
        bounds = np.cumsum([0, *(s.documents for s in self.shards)], dtype=np.int64)
        cuts = np.searchsorted(wanted, bounds)
        parts = []
        for i, shard in enumerate(self.shards):
            if cuts[i + 1] > cuts[i]:
                with shard.reopened() as table:
                    parts.append(take_rows(table.column(column), wanted[cuts[i] : cuts[i + 1]] - bounds[i]))
        taken = pa.concat_arrays(parts) if parts else pa.array([], self.table.schema.field(column).type)
        return (
            taken.take(pa.array(where.ravel()))
            if len(wanted) != len(rows) or not np.array_equal(wanted, rows)
            else taken
        )

    @property
    def num_documents(self) -> int:
        return self.table.num_rows

    @cached_property
    def lengths(self) -> np.ndarray:
        """Each document's token count (int64), read from the list offsets: no token value is touched."""
        import pyarrow.compute as pc

        column = self.table.column("input_ids")
        return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)

    @cached_property
    def hashes(self) -> np.ndarray:
        """128-bit hash of each document's normalised text: one row of 16 bytes (uint8) a document, copied
        once from the table's buffers (16 bytes a document, no Python object per document)."""
        return hash_array(self.table.column("hash"))


def hash_array(column: Any) -> np.ndarray:
    """The values of a fixed-size binary Arrow column (hashes) as an (n, width) uint8 array."""
    width = column.type.byte_width
    parts = [
        np.frombuffer(chunk.buffers()[1], dtype=np.uint8)[
            chunk.offset * width : (chunk.offset + len(chunk)) * width
        ].reshape(-1, width)
        for chunk in column.chunks
        if len(chunk)
    ]
    return np.concatenate(parts) if parts else np.empty((0, width), np.uint8)


class CorpusStep(Protocol):
    """A step over a whole source: the subset (ascending indices) of `docs` it selects."""

    def select(self, source: SourceDocs, docs: np.ndarray) -> np.ndarray: ...

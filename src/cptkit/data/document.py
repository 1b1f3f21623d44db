"""A document as it flows through `cptkit prepare`, and the ledger of every document not kept.

Nothing is lost silently: a reader or filter that drops a document records a reason and where the
document came from (`file:line`); the summary shows each reason with its count and first example.
"""

from __future__ import annotations

import codecs
import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Document:
    """Raw text of one document and where it came from (`path:line` or `path`)."""

    text: str
    where: str


@dataclass
class Ledger:
    """Counts of dropped documents by reason (and of repaired ones), with the first example of each."""

    drops: Counter = field(default_factory=Counter)
    repairs: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def drop(self, reason: str, where: str, count: int = 1) -> None:
        self.drops[reason] += count
        self.examples.setdefault(reason, where)

    def repair(self, reason: str, where: str, count: int = 1) -> None:
        """A document kept after a fix the user should know about (e.g. undecodable bytes replaced)."""
        self.repairs[reason] += count
        self.examples.setdefault(reason, where)

    def merge(self, other: Ledger) -> None:
        self.drops.update(other.drops)
        self.repairs.update(other.repairs)
        for reason, where in other.examples.items():
            self.examples.setdefault(reason, where)

    def to_dict(self) -> dict[str, Any]:
        return {"drops": dict(self.drops), "repairs": dict(self.repairs), "examples": dict(self.examples)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ledger:
        return cls(
            Counter(data.get("drops", {})), Counter(data.get("repairs", {})), dict(data.get("examples", {}))
        )


# Undecodable bytes are replaced by U+FFFD and counted, so a stray Latin-1 byte costs one character,
# not a whole document, and the summary still names the file. The count is the replacement characters
# the decoding introduced: those in the text less those the bytes already held (EF BF BD is always a
# genuine U+FFFD).
_GENUINE = "\ufffd".encode()


def decode(data: bytes) -> tuple[str, int]:
    """UTF-8 (a leading BOM removed) with undecodable bytes replaced; returns (text, bytes replaced)."""
    try:
        text = data.decode("utf-8")
        errors = 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        errors = text.count("\ufffd") - data.count(_GENUINE)
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, errors


class CountingDecode(io.BufferedIOBase):
    """A binary stream that counts, as it is read, the undecodable bytes a UTF-8 text stream on top of it
    (`errors="replace"`) turns into U+FFFD: `errors` so far. Each stream has its own count."""

    def __init__(self, raw: io.BufferedIOBase):
        self.raw = raw
        self.errors = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._tail = b""  # the last bytes seen, so a genuine U+FFFD cut between reads is still found

    def readable(self) -> bool:
        return True

    def _count(self, data: bytes) -> bytes:
        text = self._decoder.decode(data, final=not data)
        if "\ufffd" in text:
            self.errors += text.count("\ufffd") - (self._tail + data).count(_GENUINE)
        self._tail = (self._tail + data)[-2:]
        return data

    def read(self, size: int | None = -1) -> bytes:
        return self._count(self.raw.read(size))

    def read1(self, size: int = -1) -> bytes:
        return self._count(self.raw.read1(size))

    def close(self) -> None:
        self.raw.close()
        super().close()

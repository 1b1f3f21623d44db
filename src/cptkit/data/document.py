"""A document as it flows through `cptkit prepare`, and the ledger of every document not kept.

Nothing is lost silently: a reader or filter that drops a document records a reason and where the
document came from (`file:line`); the summary shows each reason with its count and first example.
"""

from __future__ import annotations

import codecs
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
# not a whole document, and the summary still names the file.
_DECODE_ERRORS = [0]


def _count_and_replace(error: UnicodeDecodeError) -> tuple[str, int]:
    _DECODE_ERRORS[0] += 1
    return "\ufffd", error.end


codecs.register_error("cptkit-count", _count_and_replace)


def decode_errors() -> int:
    """Undecodable bytes replaced so far by the "cptkit-count" error handler (compare before/after)."""
    return _DECODE_ERRORS[0]


def decode(data: bytes) -> tuple[str, int]:
    """UTF-8 (a leading BOM removed) with undecodable bytes replaced; returns (text, bytes replaced)."""
    try:
        text = data.decode("utf-8")
        errors = 0
    except UnicodeDecodeError:
        before = _DECODE_ERRORS[0]
        text = data.decode("utf-8", errors="cptkit-count")
        errors = _DECODE_ERRORS[0] - before
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, errors

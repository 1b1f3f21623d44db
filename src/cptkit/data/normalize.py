"""Text normalisation: the same text always becomes the same string, whatever produced it.

Unicode NFC (so "é" typed two ways is one token sequence and one dedup key), Unix line endings,
stray control characters removed (tab and newline kept), trailing spaces removed, runs of blank
lines collapsed to one blank line. Bump `VERSION` when the output of `normalize` changes: cached
tokenizations are keyed on it.
"""

from __future__ import annotations

import re
import unicodedata

VERSION = 1

_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x85]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x80-\x84\x86-\x9f\ufeff]")
_TRAILING = re.compile(r"[ \t\u00a0\u3000]+(?=\n)")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFC, '\\n' line endings, no control characters, no trailing spaces, at most one blank line in a row."""
    ascii_only = text.isascii()
    if not ascii_only and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    # each regex pass runs only when a cheap substring test says it can change something
    if "\r" in text or (not ascii_only and ("\u2028" in text or "\u2029" in text or "\x85" in text)):
        text = _NEWLINES.sub("\n", text)
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    if " \n" in text or "\t\n" in text or (not ascii_only and ("\u00a0\n" in text or "\u3000\n" in text)):
        text = _TRAILING.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip("\n").rstrip()

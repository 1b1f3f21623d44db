"""The elements of a top-level JSON array, read from a text stream one at a time, so a `.json` file of
many GB never has to be in memory at once (only the element being parsed does)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, TextIO

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


class _Buffer:
    """A window on the stream: `text[pos:]` is what is not parsed yet; `more()` reads on."""

    def __init__(self, stream: TextIO, chunk_chars: int):
        self.stream, self.chunk = stream, chunk_chars
        self.text, self.pos, self.eof = "", 0, False

    def more(self) -> bool:
        """Append at least one chunk (as much as is held, so a huge element costs O(n log n)); False at EOF."""
        if self.eof:
            return False
        data = self.stream.read(max(self.chunk, len(self.text) - self.pos))
        if not data:
            self.eof = True
            return False
        self.text = self.text[self.pos :] + data
        self.pos = 0
        return True

    def skip_whitespace(self) -> str:
        """The next character that is not whitespace ("" at the end of the stream)."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""


def _may_go_on(value: Any, text: str, end: int) -> bool:
    """A number that reaches the end of what is read (or stops at a character a number can continue
    with, like the "." of "-0." when "5" is not read yet) may be longer than parsed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return end == len(text)  # true, false, null, strings, arrays, objects end on their own character
    return not text[end:].strip("0123456789.eE+-")


def iter_json_array(stream: TextIO, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Yield each element of the JSON array that `stream` holds. Raises ValueError, naming the element
    index, where the text stops being a well-formed array; elements before it have been yielded."""
    buf = _Buffer(stream, chunk_chars)
    if buf.skip_whitespace() != "[":
        raise ValueError("not a JSON array")
    buf.pos += 1
    index = 0
    if buf.skip_whitespace() == "]":
        return
    while True:
        if buf.skip_whitespace() == "":
            raise ValueError(f"element {index}: the file ends inside the array")
        while True:
            try:
                value, end = _DECODER.raw_decode(buf.text, buf.pos)
            except ValueError as e:
                if buf.more():  # the element may run past what is read so far
                    continue
                raise ValueError(f"element {index}: {e}") from None
            if _may_go_on(value, buf.text, end) and buf.more():  # e.g. "-0." + "5": read on, parse again
                continue
            break
        buf.pos = end
        yield value
        index += 1
        separator = buf.skip_whitespace()
        if separator == "]":
            return
        if separator != ",":
            raise ValueError(f"after element {index - 1}: expected ',' or ']', found {separator!r}")
        buf.pos += 1

"""Document filters. Each is a function `text -> reason | None`: None keeps the document, a reason
(a short snake_case string) drops it and is counted under that name in the manifest.

Adding a filter: write one such function and add it in `build_filters` (with its config field in
`FilterConfig`). Filters run on normalised text, cheapest first, and the first reason wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from cptkit.config.data import FilterConfig

Filter = Callable[[str], "str | None"]

# Characters counted as text: letters, digits and "_" (\w), whitespace, ASCII and common Unicode
# punctuation, and the combining marks of scripts whose vowels are marks. Whatever remains (symbols,
# private-use and replacement characters, box drawing, stray bytes) is "non-text".
_TEXT_CHARS = re.compile(
    r"[\w\s!-/:-@\[-`{-~\u00a1-\u00bf\u00d7\u00f7\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a"
    r"\u064b-\u065f\u0900-\u0dff\u0e00-\u0e7f\u2010-\u205e\u20ac\u3000-\u303f\uff01-\uff65]+"
)
_WORD = re.compile(r"\S+")


def empty(text: str) -> str | None:
    return "empty" if not text.strip() else None


def min_chars(limit: int) -> Filter:
    def check(text: str) -> str | None:
        return "too_short" if len(text) < limit else None

    return check


def max_chars(limit: int) -> Filter:
    def check(text: str) -> str | None:
        return "too_long" if len(text) > limit else None

    return check


def min_words(limit: int) -> Filter:
    def check(text: str) -> str | None:
        for count, _ in enumerate(_WORD.finditer(text), 1):
            if count >= limit:
                return None
        return "too_few_words"

    return check


def max_non_text_fraction(limit: float) -> Filter:
    def check(text: str) -> str | None:
        if text.isascii():  # normalised ASCII holds only printable characters, tab and newline
            return None
        non_text = len(_TEXT_CHARS.sub("", text))
        return "mostly_non_text" if non_text > limit * len(text) else None

    return check


def build_filters(cfg: FilterConfig) -> list[Filter]:
    """The configured filters, cheapest first."""
    filters = [empty, min_chars(cfg.min_chars)]
    if cfg.max_chars is not None:
        filters.append(max_chars(cfg.max_chars))
    if cfg.min_words > 0:
        filters.append(min_words(cfg.min_words))
    if cfg.max_non_text_fraction < 1:
        filters.append(max_non_text_fraction(cfg.max_non_text_fraction))
    return filters


def first_reason(text: str, filters: list[Filter]) -> str | None:
    """The reason the first failing filter gives, or None when the document is kept."""
    for f in filters:
        reason = f(text)
        if reason is not None:
            return reason
    return None

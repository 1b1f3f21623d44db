"""Document filters, each a document step (`cptkit.data.steps`): `text -> text | Drop(reason)`. The
text comes back unchanged to keep the document; a drop's reason (a short snake_case string) is counted
under that name in the manifest.

Adding a filter: write one such function and add it in `build_filters` (with its config field in
`FilterConfig`). Filters run on normalised text, cheapest first, and the first drop wins.
"""

from __future__ import annotations

import re
from functools import partial

from cptkit.config.data import FilterConfig
from cptkit.data.steps import DocumentStep, Drop, apply_steps

# Characters counted as text: letters, digits and "_" (\w), whitespace, ASCII and common Unicode
# punctuation, and the combining marks of scripts whose vowels are marks. Whatever remains (symbols,
# private-use and replacement characters, box drawing, stray bytes) is "non-text".
_TEXT_CHARS = re.compile(
    r"[\w\s!-/:-@\[-`{-~\u00a1-\u00bf\u00d7\u00f7\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a"
    r"\u064b-\u065f\u0900-\u0dff\u0e00-\u0e7f\u2010-\u205e\u20ac\u3000-\u303f\uff01-\uff65]+"
)
_WORD = re.compile(r"\S+")


def empty(text: str) -> str | Drop:
    return Drop("empty") if not text.strip() else text


# Each configurable filter is a module-level function with its limit bound by `partial`, so the
# filters pickle: a process pool started without fork receives them whole.
def min_chars(limit: int) -> DocumentStep:
    return partial(_min_chars, limit)


def _min_chars(limit: int, text: str) -> str | Drop:
    return Drop("too_short") if len(text) < limit else text


def max_chars(limit: int) -> DocumentStep:
    return partial(_max_chars, limit)


def _max_chars(limit: int, text: str) -> str | Drop:
    return Drop("too_long") if len(text) > limit else text


def min_words(limit: int) -> DocumentStep:
    return partial(_min_words, limit)


def _min_words(limit: int, text: str) -> str | Drop:
    for count, _ in enumerate(_WORD.finditer(text), 1):
        if count >= limit:
            return text
    return Drop("too_few_words")


def max_non_text_fraction(limit: float) -> DocumentStep:
    return partial(_max_non_text_fraction, limit)


def _max_non_text_fraction(limit: float, text: str) -> str | Drop:
    if text.isascii():  # normalised ASCII holds only printable characters, tab and newline
        return text
    non_text = len(_TEXT_CHARS.sub("", text))
    return Drop("mostly_non_text") if non_text > limit * len(text) else text


def build_filters(cfg: FilterConfig) -> list[DocumentStep]:
    """The configured filters, cheapest first."""
    filters = [empty, min_chars(cfg.min_chars)]
    if cfg.max_chars is not None:
        filters.append(max_chars(cfg.max_chars))
    if cfg.min_words > 0:
        filters.append(min_words(cfg.min_words))
    if cfg.max_non_text_fraction < 1:
        filters.append(max_non_text_fraction(cfg.max_non_text_fraction))
    return filters


def first_reason(text: str, filters: list[DocumentStep]) -> str | None:
    """The reason the first failing filter gives, or None when the document is kept."""
    out = apply_steps(filters, text)
    return out.reason if isinstance(out, Drop) else None

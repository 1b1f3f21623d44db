"""Fertility: how many tokens a tokenizer spends on a source's text, per 1,000 characters and per word.

A domain whose text costs more tokens than general text fits less of itself in every row and trains
slower per character; extending the vocabulary (`data.vocabulary`) is the remedy, and fertility is how
one sees the need and the gain. Words are whitespace-separated; scripts written without spaces (Han,
kana, Thai, Lao, Khmer, Myanmar) have no such words, so for a source mostly in them the unit is the
character and tokens per word is not given (it would count sentences, not words).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# Scripts written without spaces between words. Hangul is left out: Korean separates words by spaces.
_SPACELESS = re.compile(
    "[\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf"  # CJK Extension A
    "\u4e00-\u9fff"  # CJK Unified Ideographs
    "\uf900-\ufaff"  # CJK Compatibility Ideographs
    "\U00020000-\U0003134f]+"  # CJK Extensions B-G
)  # runs, not characters: one match per run between punctuation, so CJK text costs little to count
# a source whose sampled characters are at least this share spaceless-script ones is counted per character
CHARACTER_UNIT_SHARE = 0.3
# the script is judged on each document's first this many characters: searching whole documents cost
# 2.5% of tokenize time on 67 MB of English (words alone: 1.3%), the prefix keeps it all under 2%
SCRIPT_SAMPLE_CHARS = 2000


def count_words(texts: Sequence[str]) -> tuple[int, int, int]:
    """(whitespace-separated words, characters of spaceless scripts, characters searched for them) in
    `texts`; words are counted in the whole text, the script in each text's first `SCRIPT_SAMPLE_CHARS`.
    ASCII text is never searched (`str.isascii` answers at memory speed); other text loses its spaceless
    runs in one `re.sub`."""
    words = spaceless = sampled = 0
    for t in texts:
        words += len(t.split())
        head = t[:SCRIPT_SAMPLE_CHARS]
        sampled += len(head)
        if not head.isascii():
            spaceless += len(head) - len(_SPACELESS.sub("", head))
    return words, spaceless, sampled


def fertility(
    characters: int, tokens: int, words: int | None, spaceless: int | None, sampled: int | None = None
) -> dict[str, Any]:
    """The manifest's per-source `fertility`: tokens per 1,000 characters and per character, tokens per
    word where words are the unit, and the unit: "character" where `spaceless` is at least
    `CHARACTER_UNIT_SHARE` of the `sampled` characters (None: of all `characters`). `words` / `spaceless` None (stats written before they
    were counted): per word and the unit are not known, so null, never a guess. `tokens` are the
    tokens as stored, BOS and EOS of each document included: what training pays for the text."""
    per_char = tokens / characters if characters else None
    if spaceless is None or words is None:
        unit = None
    else:
        searched = characters if sampled is None else sampled
        unit = "character" if searched and spaceless >= CHARACTER_UNIT_SHARE * searched else "word"
    per_word = tokens / words if unit == "word" and words else None
    return {
        "tokens_per_1k_chars": None if per_char is None else round(1000 * per_char, 3),
        "tokens_per_word": None if per_word is None else round(per_word, 4),
        "tokens_per_char": None if per_char is None else round(per_char, 5),
        "unit": unit,
    }


def before_after(vocabulary: dict[str, Any] | None, source: str) -> str | None:
    """The vocabulary extension's fertility on `source`, 'before -> after (change)' in tokens per 1k
    chars, from a `fertility` mapping of source -> {before, after}; None where it has no such entry."""
    entry = ((vocabulary or {}).get("fertility") or {}).get(source)
    if not entry or entry.get("before") is None or entry.get("after") is None:
        return None
    before, after = _per_1k(entry["before"]), _per_1k(entry["after"])
    change = f" ({after / before - 1:+.1%})" if before else ""
    return f"{before:.1f} -> {after:.1f}{change}"


def _per_1k(value: Any) -> float:
    """Tokens per 1k chars from a number or from a fertility entry (`tokens_per_1k_chars`)."""
    return float(value["tokens_per_1k_chars"] if isinstance(value, dict) else value)

"""Learn a vocabulary extension (`data.vocabulary`): continue the base tokenizer's BPE merges on domain text.

Words are what the base tokenizer's own normaliser and pre-tokenizer make of the text; each word type
starts from its base segmentation (`backend_tokenizer.model.tokenize`). Then greedy BPE: merge the most
frequent adjacent pair (counts weighted by word frequency; ties broken by the pair's strings) into a new
token, again and again. The merges are appended after every base merge, so they fire only once the base
merges are done: the segmentation simulated here is the one the extended tokenizer produces, and each
merge's count of replaced pairs is exactly the base tokens it saves on the sample.

Pair counts are kept incrementally (pair -> count, pair -> the words holding it, a heap with lazy
invalidation), so 10,000 merges over a million word types take seconds, not hours.
"""

from __future__ import annotations

import heapq
import json
import logging
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cptkit.data.vocabulary_file import NewToken
from cptkit.errors import CptkitError

log = logging.getLogger(__name__)

WHERE = "data.vocabulary"
_CHECKED_WORDS = 2000  # word types whose extended segmentation is compared with the simulated one
_CHECKED_DOCUMENTS = 50  # sample documents decoded with both tokenizers


@dataclass
class WordCounts:
    """The sample, as word types and their counts per source (words: the base pre-tokenizer's)."""

    per_source: dict[str, Counter] = field(default_factory=dict)
    documents: dict[str, int] = field(default_factory=dict)
    characters: dict[str, int] = field(default_factory=dict)
    kept_documents: list[str] = field(default_factory=list)  # the first few, for the lossless check

    @property
    def total(self) -> Counter:
        total: Counter = Counter()
        for counts in self.per_source.values():
            total.update(counts)
        return total


@dataclass
class Extension:
    """What `learn_extension` found: the new tokens, the extended tokenizer, and fertility on the sample."""

    tokens: list[NewToken]
    tokenizer: Any  # PreTrainedTokenizerFast: the base's settings, the extended vocabulary and merges
    base_size: int
    sample: dict[str, Any]  # {sources, documents, characters}
    fertility: dict[str, dict[str, float]]  # source -> {before, after}: tokens per 1,000 characters


def check_extendable(base: Any) -> dict[str, Any]:
    """The base's tokenizer.json as a dict, or a CptkitError saying why it cannot be extended the same way."""
    backend = getattr(base, "backend_tokenizer", None)
    if backend is None or not getattr(base, "is_fast", False):
        raise CptkitError(
            f"{WHERE}.extend: the tokenizer {type(base).__name__} is a slow (Python) tokenizer with no "
            "tokenizer.json; extending needs a fast tokenizer (data.tokenizer pointing to a folder with tokenizer.json)"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise CptkitError(
            f"{WHERE}.extend: the tokenizer's model is {kind}, not BPE; only BPE tokenizers can be extended "
            "by continuing their merges (set data.vocabulary.extend: 0)"
        )
    if spec.get("pre_tokenizer") is None:
        raise CptkitError(
            f"{WHERE}.extend: the tokenizer is a BPE with no pre-tokenizer (BPE over the whole text, as in "
            "Llama-2-style sentencepiece conversions): its words cannot be split the same way; set "
            "data.vocabulary.extend: 0"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise CptkitError(
            f"{WHERE}.extend: the tokenizer's BPE uses a continuing-subword prefix or end-of-word suffix, "
            "which this extension does not support; set data.vocabulary.extend: 0"
        )
    return spec


def count_words(base: Any, texts: Mapping[str, Iterable[str]], sample_chars: int) -> WordCounts:
    """Word types per source on at most `sample_chars` characters in all (the first documents, in order)."""
    backend = base.backend_tokenizer
    normalizer, pre = backend.normalizer, backend.pre_tokenizer
    counts = WordCounts()
    left = sample_chars
    for source, docs in texts.items():
        words: Counter = Counter()
        n = chars = 0
        for text in docs:
            if left <= 0:
                break
            text = text[:left]
            left -= len(text)
            n += 1
            chars += len(text)
            if len(counts.kept_documents) < _CHECKED_DOCUMENTS:
                counts.kept_documents.append(text)
            normal = normalizer.normalize_str(text) if normalizer is not None else text
            words.update(w for w, _ in pre.pre_tokenize_str(normal))
        counts.per_source[source], counts.documents[source], counts.characters[source] = words, n, chars
    return counts


class _Merger:
    """Greedy BPE over word types, with incremental pair counts."""

    def __init__(self, words: list[list[int]], freqs: list[int], strings: list[str]):
        self.words, self.freqs, self.strings = words, freqs, strings
        self.counts: dict[tuple[int, int], int] = defaultdict(int)
        self.where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for i, w in enumerate(words):
            for pair in zip(w, w[1:], strict=False):
                self.counts[pair] += freqs[i]
                self.where[pair].add(i)
        self.heap = [self._entry(p, c) for p, c in self.counts.items()]
        heapq.heapify(self.heap)

    def _entry(self, pair: tuple[int, int], count: int) -> tuple[int, str, str, tuple[int, int]]:
        return (-count, self.strings[pair[0]], self.strings[pair[1]], pair)

    def best(self, banned: set[tuple[int, int]]) -> tuple[tuple[int, int], int] | None:
        """The most frequent pair (ties: by its strings), None when no pair is left."""
        while self.heap:
            neg, _, _, pair = self.heap[0]
            current = self.counts.get(pair, 0)
            if pair in banned or current <= 0:
                heapq.heappop(self.heap)
            elif -neg != current:  # stale: counts only fall between pushes, so push the current one back
                heapq.heapreplace(self.heap, self._entry(pair, current))
            else:
                return pair, current
        return None

    def merge(self, pair: tuple[int, int], new: int) -> int:
        """Replace `pair` by `new` in every word holding it; returns the merges made (weighted)."""
        a, b = pair
        made = 0
        changed: dict[tuple[int, int], int] = defaultdict(int)
        for i in self.where.pop(pair, ()):
            w, f = self.words[i], self.freqs[i]
            merged, n = _merged(w, a, b, new)
            if not n:  # a word that held the pair once, before an earlier merge took it
                continue
            made += n * f
            for p in zip(w, w[1:], strict=False):
                changed[p] -= f
            for p in zip(merged, merged[1:], strict=False):
                changed[p] += f
                self.where[p].add(i)
            self.words[i] = merged
        for p, delta in changed.items():
            if delta:
                self.counts[p] += delta
                if delta > 0:
                    heapq.heappush(self.heap, self._entry(p, self.counts[p]))
        self.counts.pop(pair, None)
        return made

    def collapse(self, i: int, new: int) -> int:
        """Word `i` becomes the one token `new` (a BPE with `ignore_merges` maps a word found whole in
        its vocabulary straight to it); returns the tokens saved (weighted)."""
        w, f = self.words[i], self.freqs[i]
        if w == [new]:
            return 0
        for p in zip(w, w[1:], strict=False):
            self.counts[p] -= f
        self.words[i] = [new]
        return (len(w) - 1) * f


def _merged(w: list[int], a: int, b: int, new: int) -> tuple[list[int], int]:
    """`w` with each (a, b) left to right replaced by `new`, and how many were (list.index skips in C)."""
    merged: list[int] = []
    j = n = 0
    last = len(w) - 1
    while True:
        try:
            k = w.index(a, j, last)
        except ValueError:
            merged.extend(w[j:])
            return merged, n
        if w[k + 1] == b:
            merged.extend(w[j:k])
            merged.append(new)
            j = k + 2
            n += 1
        else:
            merged.extend(w[j : k + 1])
            j = k + 1


def learn_merges(
    base: Any, words: Counter, extend: int, min_frequency: int
) -> tuple[list[tuple[str, str, str]], list[int], dict[str, list[int]], list[str]]:
    """Up to `extend` merges on `words`: [(left, right, merged string)], each one's weighted merge
    count, each word's final segmentation (ids; new ids from len(base)), and the id -> string table."""
    model = base.backend_tokenizer.model
    vocab = base.backend_tokenizer.get_vocab(with_added_tokens=True)
    base_size = len(base)
    strings = [""] * base_size
    for s, i in vocab.items():
        if i < base_size:
            strings[i] = s
    types = list(words)
    segmented = [[t.id for t in model.tokenize(w)] for w in types]
    merger = _Merger(segmented, [words[w] for w in types], strings)
    # a BPE with ignore_merges takes a word found whole in the vocabulary as one token, merges or not
    whole = {w: i for i, w in enumerate(types)} if _ignores_merges(base) else {}
    known = set(vocab)
    merges: list[tuple[str, str, str]] = []
    made: list[int] = []
    banned: set[tuple[int, int]] = set()
    while len(merges) < extend:
        found = merger.best(banned)
        if found is None or found[1] < min_frequency:
            break
        pair, _ = found
        text = strings[pair[0]] + strings[pair[1]]
        if text in known:  # the base holds this string already (unreachable by its merges): never a duplicate
            banned.add(pair)
            continue
        new = len(strings)
        strings.append(text)
        known.add(text)
        merges.append((strings[pair[0]], strings[pair[1]], text))
        saved = merger.merge(pair, new)
        if text in whole:
            saved += merger.collapse(whole[text], new)
        made.append(saved)
    return merges, made, dict(zip(types, merger.words, strict=True)), strings


def _ignores_merges(base: Any) -> bool:
    return bool(json.loads(base.backend_tokenizer.to_str())["model"].get("ignore_merges"))


def extended_tokenizer(base: Any, spec: dict[str, Any], merges: list[tuple[str, str, str]]) -> Any:
    """The base tokenizer with `merges` appended (lowest priority) and their strings at ids len(base)+i;
    special tokens, chat template and BOS/EOS settings are the base's."""
    from transformers import AutoTokenizer

    spec = json.loads(json.dumps(spec))
    model = spec["model"]
    base_size = len(base)
    for i, (_, _, text) in enumerate(merges):
        model["vocab"][text] = base_size + i
    old = model.get("merges") or []
    as_lists = (old and not isinstance(old[0], str)) or any(" " in a or " " in b for a, b, _ in merges)
    if as_lists and old and isinstance(old[0], str):
        old = [m.split(" ", 1) for m in old]
    model["merges"] = list(old) + [[a, b] if as_lists else f"{a} {b}" for a, b, _ in merges]
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(tmp)
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    return tok


def learn_extension(
    base: Any,
    texts: Mapping[str, Iterable[str]],
    extend: int,
    min_frequency: int = 5,
    sample_chars: int = 100_000_000,
) -> Extension:
    """Learn `extend` new tokens on `texts` (source -> its documents, already normalised by cptkit) and
    build the extended tokenizer, verified: base ids unchanged, simulated segmentation == the tokenizer's,
    decoding lossless. Raises CptkitError when the base cannot be extended or the sample supports fewer."""
    spec = check_extendable(base)
    counts = count_words(base, texts, sample_chars)
    total = counts.total
    merges, made, final, strings = learn_merges(base, total, extend, min_frequency)
    if len(merges) < extend:
        raise CptkitError(
            f"{WHERE}.extend: the sample supports only {len(merges)} new tokens at min_frequency "
            f"{min_frequency}: lower data.vocabulary.extend, lower min_frequency or add domain text "
            f"(sample: {sum(counts.characters.values()):,} characters, {len(total):,} distinct words)"
        )
    tok = extended_tokenizer(base, spec, merges)
    base_size = len(base)
    _verify(base, tok, final, counts.kept_documents)
    used: Counter = Counter()
    for word, ids in final.items():
        for i in ids:
            if i >= base_size:
                used[i] += total[word]
    pieces: dict[int, tuple[int, ...]] = {}
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    tokens = []
    for k, (a, b, text) in enumerate(merges):
        new = base_size + k
        pieces[new] = _pieces(vocab[a], pieces) + _pieces(vocab[b], pieces)
        tokens.append(NewToken(new, text, tok.decode([new]), pieces[new], used[new], made[k]))
    base_model = base.backend_tokenizer.model
    fertility = {
        source: _fertility(words, final, base_model, counts.characters[source])
        for source, words in counts.per_source.items()
    }
    sample = {
        "sources": list(counts.per_source),
        "documents": sum(counts.documents.values()),
        "characters": sum(counts.characters.values()),
    }
    return Extension(tokens, tok, base_size, sample, fertility)


def _pieces(i: int, pieces: dict[int, tuple[int, ...]]) -> tuple[int, ...]:
    return pieces.get(i, (i,))


def _fertility(
    words: Counter, final: dict[str, list[int]], base_model: Any, characters: int
) -> dict[str, float]:
    """Tokens per 1,000 characters on a source's sample, base and extended (the words' tokens)."""
    after = sum(len(final[w]) * c for w, c in words.items())
    saved = sum((len(base_model.tokenize(w)) - len(final[w])) * c for w, c in words.items())
    per = 1000 / characters if characters else 0.0
    return {"before": round((after + saved) * per, 3), "after": round(after * per, 3)}


def _verify(base: Any, tok: Any, final: dict[str, list[int]], documents: list[str]) -> None:
    """The extended tokenizer is what was simulated, and loses nothing: else an internal error, loudly."""
    base_vocab = base.get_vocab()
    ext_vocab = tok.get_vocab()
    moved = [s for s, i in base_vocab.items() if ext_vocab.get(s) != i]
    if moved:
        raise CptkitError(
            f"{WHERE}: the extended tokenizer changed base ids (e.g. {moved[:3]}); please report this"
        )
    model = tok.backend_tokenizer.model
    for word in list(final)[:_CHECKED_WORDS]:
        got = [t.id for t in model.tokenize(word)]
        if got != final[word]:
            raise CptkitError(
                f"{WHERE}: the extended tokenizer splits {word!r} as {got}, not as learnt {final[word]} "
                "(a tokenizer option this extension does not model); set data.vocabulary.extend: 0"
            )
    for text in documents:
        before = base.decode(base.encode(text, add_special_tokens=False))
        after = tok.decode(tok.encode(text, add_special_tokens=False))
        if before != after:
            raise CptkitError(
                f"{WHERE}: the extended tokenizer does not decode {text[:60]!r} as the base does; please report this"
            )

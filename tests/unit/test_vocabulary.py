"""Learning a vocabulary extension: the merges chosen, the extended tokenizer, and the refusals."""

from __future__ import annotations

from collections import Counter

import pytest

from cptkit.data.vocabulary import count_words, learn_extension, learn_merges
from cptkit.errors import CptkitError


def _fast(tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", bos_token="<s>")


def _metaspace_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    chars = sorted({c for t in texts for c in t} | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=chars, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _fast(tok)


def test_fixture_is_byte_level_bpe(tiny_tokenizer):
    import json

    spec = json.loads(tiny_tokenizer.backend_tokenizer.to_str())
    assert spec["model"]["type"] == "BPE"
    assert spec["pre_tokenizer"]["type"] == "ByteLevel"


def _ignoring_merges(base):
    """The same byte-level BPE with ignore_merges (as Llama-3's): a word in the vocabulary is one token."""
    import json

    from tokenizers import Tokenizer

    spec = json.loads(base.backend_tokenizer.to_str())
    spec["model"]["ignore_merges"] = True
    return _fast(Tokenizer.from_str(json.dumps(spec)))


@pytest.mark.parametrize("kind", ["byte_level", "metaspace", "ignore_merges"])
def test_extension_keeps_ids_saves_what_it_says_and_loses_nothing(kind, tiny_tokenizer, paragraphs):
    base = {
        "byte_level": tiny_tokenizer,
        "metaspace": None,
        "ignore_merges": _ignoring_merges(tiny_tokenizer),
    }[kind] or _metaspace_tokenizer(paragraphs)
    ext = learn_extension(base, {"domain": paragraphs}, extend=40, min_frequency=2)
    tok = ext.tokenizer
    assert len(tok) == len(base) + 40 and ext.base_size == len(base)
    assert [t.id for t in ext.tokens] == list(range(len(base), len(base) + 40))
    assert all(tok.convert_ids_to_tokens(i) == s for s, i in base.get_vocab().items())
    assert tok.eos_token_id == base.eos_token_id and tok.bos_token_id == base.bos_token_id
    for t in ext.tokens:  # each new token is its base pieces, joined
        assert tok.convert_ids_to_tokens(t.id) == t.token
        assert tok.decode([t.id]) == t.text == base.decode(list(t.pieces))
        assert all(p < len(base) for p in t.pieces) and len(t.pieces) >= 2
    before = sum(len(base.encode(d, add_special_tokens=False)) for d in paragraphs)
    after = sum(len(tok.encode(d, add_special_tokens=False)) for d in paragraphs)
    assert before - after == sum(t.saved for t in ext.tokens) > 0
    for d in paragraphs[:200]:
        assert tok.decode(tok.encode(d, add_special_tokens=False)) == base.decode(
            base.encode(d, add_special_tokens=False)
        )
    f = ext.fertility["domain"]
    chars = sum(len(d) for d in paragraphs)
    assert f["before"] == pytest.approx(before * 1000 / chars, abs=1e-3)
    assert f["after"] == pytest.approx(after * 1000 / chars, abs=1e-3) and f["after"] < f["before"]


def _naive_merges(base, words: Counter, extend: int, min_frequency: int) -> list[tuple[str, str]]:
    """Greedy BPE recounting every pair after every merge: the reference the incremental one must match."""
    model = base.backend_tokenizer.model
    known = set(base.get_vocab())
    segs = {w: [t.value for t in model.tokenize(w)] for w in words}
    merges, banned = [], set()
    while len(merges) < extend:
        counts: Counter = Counter()
        for w, seg in segs.items():
            for pair in zip(seg, seg[1:], strict=False):
                counts[pair] += words[w]
        candidates = [(-c, p) for p, c in counts.items() if p not in banned]
        if not candidates:
            break
        neg, pair = min(candidates)
        if -neg < min_frequency:
            break
        if pair[0] + pair[1] in known:
            banned.add(pair)
            continue
        known.add(pair[0] + pair[1])
        merges.append(pair)
        for w, seg in segs.items():
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == pair:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[w] = out
    return merges


def test_merges_are_the_most_frequent_ones(tiny_tokenizer, paragraphs):
    words = count_words(tiny_tokenizer, {"d": paragraphs[:300]}, 10**9).total
    merges, made, _, _ = learn_merges(tiny_tokenizer, words, 60, 2)
    assert [(a, b) for a, b, _ in merges] == _naive_merges(tiny_tokenizer, words, 60, 2)
    assert len(made) == len(merges) and min(made) >= 2


def test_sample_chars_bounds_the_sample(tiny_tokenizer, paragraphs):
    counts = count_words(tiny_tokenizer, {"a": paragraphs, "b": paragraphs}, 5000)
    assert sum(counts.characters.values()) == 5000
    assert counts.documents["b"] == 0


def test_refuses_more_tokens_than_the_sample_supports(tiny_tokenizer, paragraphs):
    with pytest.raises(CptkitError, match=r"supports only \d+ new tokens at min_frequency 50: lower"):
        learn_extension(tiny_tokenizer, {"d": paragraphs[:20]}, extend=5000, min_frequency=50)


def test_refuses_a_wordpiece_tokenizer(paragraphs):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        paragraphs, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"])
    )
    with pytest.raises(CptkitError, match="data.vocabulary.extend: .*model is WordPiece, not BPE"):
        learn_extension(_fast(tok), {"d": paragraphs}, extend=5)


def test_refuses_a_bpe_without_pre_tokenizer(tiny_tokenizer, paragraphs):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    raw.pre_tokenizer = None
    with pytest.raises(CptkitError, match="no pre-tokenizer"):
        learn_extension(_fast(raw), {"d": paragraphs}, extend=5)


def test_refuses_a_slow_tokenizer(paragraphs):
    class Slow:
        is_fast = False

    with pytest.raises(CptkitError, match="slow .*tokenizer.json"):
        learn_extension(Slow(), {"d": paragraphs}, extend=5)

"""Unit tests of the data stages that work on ids: packing, chunking, mixing, held-out split, dedup,
normalisation and filters."""

from __future__ import annotations

import numpy as np
import pytest

from cptkit.config.data import FilterConfig
from cptkit.data.chunk import CHUNKERS, windows
from cptkit.data.dedup import Deduper
from cptkit.data.filters import build_filters, first_reason
from cptkit.data.mix import sample, sampling_factors
from cptkit.data.normalize import normalize
from cptkit.data.pack import best_fit_pack
from cptkit.data.split import heldout_mask


def test_best_fit_pack_fills_rows_and_keeps_every_segment():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500).tolist()
    rows = best_fit_pack(lengths, 128)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    lower_bound = -(-sum(lengths) // 128)
    assert len(rows) <= lower_bound * 1.05 + 1


def test_best_fit_pack_picks_the_tightest_row():
    # 70 opens row 0 (room 30), 60 opens row 1 (room 40); 30 fits both, best fit is row 0
    assert best_fit_pack([70, 60, 30], 100) == [[0, 2], [1]]
    assert best_fit_pack([], 10) == []
    with pytest.raises(ValueError):
        best_fit_pack([11], 10)


def _tiles(lengths, doc, off, length):
    for d, n in enumerate(lengths):
        mine = np.flatnonzero(doc == d)
        covered = np.concatenate([np.arange(off[i], off[i] + length[i]) for i in mine]) if len(mine) else []
        assert list(covered) == list(range(n)), f"document {d} not tiled exactly once"


@pytest.mark.parametrize("chunking", ["packing", "tokens", "sentences", "chars"])
def test_every_strategy_tiles_every_document_exactly_once(chunking):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 300, size=50)
    starts = [np.unique(np.concatenate([[0], rng.integers(0, n, size=5)])) for n in lengths]
    doc, off, length = CHUNKERS[chunking](seq_length=64, chunk_tokens=32).segments(lengths, starts)
    _tiles(lengths, doc, off, length)
    assert length.max() <= (32 if chunking in ("tokens", "sentences") else 64)
    assert length.min() > 0


def test_windows_cut_only_long_documents():
    doc, off, length = windows(np.array([10, 25]), 10)
    assert (
        doc.tolist() == [0, 1, 1, 1] and off.tolist() == [0, 0, 10, 20] and length.tolist() == [10, 10, 10, 5]
    )


def test_sentences_group_whole_sentences_up_to_the_budget():
    sentences = CHUNKERS["sentences"](seq_length=64, chunk_tokens=25)
    doc, off, length = sentences.segments(np.array([40]), [np.array([0, 10, 20, 30])])
    assert list(zip(off.tolist(), length.tolist(), strict=True)) == [(0, 20), (20, 20)]


@pytest.mark.parametrize("policy", ["downsample", "upsample"])
def test_mix_meets_the_ratio_within_one_percent(policy):
    rng = np.random.default_rng(2)
    lens = {"a": rng.integers(20, 200, 3000), "b": rng.integers(20, 200, 400)}
    factors = sampling_factors({k: int(v.sum()) for k, v in lens.items()}, {"a": 0.7, "b": 0.3}, policy)
    got = {k: lens[k][sample(lens[k], factors[k], rng)].sum() for k in lens}
    share = got["a"] / (got["a"] + got["b"])
    assert abs(share - 0.7) < 0.01
    # the binding source keeps every token; the others are dropped from (downsample) or repeated (upsample)
    bound = max(factors.values()) if policy == "downsample" else min(factors.values())
    assert bound == pytest.approx(1.0)


def test_mix_repeats_whole_segments_when_upsampling():
    picked = sample(np.array([5, 5, 5, 5]), 2.5, np.random.default_rng(0))
    counts = np.bincount(picked, minlength=4)
    assert counts.sum() == 10 and set(counts.tolist()) <= {2, 3}


def test_heldout_split_is_deterministic_capped_and_order_free():
    hashes = [i.to_bytes(16, "little") for i in range(1000)]
    mask = heldout_mask(hashes, 0.1, None, seed=7)
    assert 60 < mask.sum() < 140
    again = heldout_mask(hashes[::-1], 0.1, None, seed=7)[::-1]
    assert (mask == again).all()
    assert heldout_mask(hashes, 0.1, 5, seed=7).sum() == 5
    assert (heldout_mask(hashes, 0.1, None, seed=8) != mask).any()
    assert heldout_mask(hashes[:1], 0.5, None, seed=7).sum() == 0  # the only document stays in training
    assert heldout_mask(hashes[:3], 0.01, None, seed=7).sum() == 1  # an evaluation set is never empty


def test_dedup_keeps_first_occurrence_across_calls():
    d = Deduper()
    assert d.keep_mask([b"a", b"b", b"a"]).tolist() == [True, True, False]
    assert d.keep_mask([b"b", b"c"]).tolist() == [False, True]
    assert Deduper(enabled=False).keep_mask([b"a", b"a"]).tolist() == [True, True]


def test_normalize():
    raw = "Cafe\u0301 \r\nline\x07 two  \r\n\n\n\n\nend\t \n\n"
    assert normalize(raw) == "Caf\u00e9\nline two\n\nend"
    assert normalize("plain ascii") == "plain ascii"


def test_filters_give_reasons():
    filters = build_filters(FilterConfig(min_chars=10, max_chars=100, min_words=3, max_non_text_fraction=0.3))
    assert first_reason("   ", filters) == "empty"
    assert first_reason("short", filters) == "too_short"
    assert first_reason("x" * 101, filters) == "too_long"
    assert first_reason("onlytwo words", filters) == "too_few_words"
    assert first_reason("\ufffd\ufffd\ufffd\ufffd\ufffd\ufffd\ufffd a b c", filters) == "mostly_non_text"
    assert first_reason("A normal sentence, with punctuation.", filters) is None
    assert first_reason("Пример текста на русском — и «кавычки».", filters) is None


def test_row_gather_is_the_same_in_small_blocks():
    """Rows gathered a few at a time join into the rows gathered at once: every segment's tokens in
    place, position ids counting from 0 per segment, rows cut at whole-row boundaries."""
    from cptkit.data import assemble

    rng = np.random.default_rng(0)
    flat = rng.integers(0, 1000, 100_000).astype(np.int32)
    lens = rng.integers(1, 64, 2000)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    rows = assemble._pack(flat, starts, lens, 64, np.random.default_rng(1))

    def joined(max_tokens):
        ids, pos, offsets, base = [], [], [np.zeros(1, np.int64)], 0
        for i, p, o, *_ in rows.blocks(max_tokens):
            assert o[0] == 0 and o[-1] == len(i) == len(p)
            ids.append(i), pos.append(p), offsets.append(o[1:] + base)
            base += len(i)
        return np.concatenate(ids), np.concatenate(pos), np.concatenate(offsets)

    whole = joined(1 << 30)
    for small in (1, 100, 1000):
        for a, b in zip(whole, joined(small), strict=True):
            assert (a == b).all()
    ids, pos, offsets = whole
    assert offsets[-1] == lens.sum() == rows.num_tokens and len(offsets) == rows.num_rows + 1
    assert sorted(ids.tolist()) == sorted(flat[: lens.sum()].tolist())  # every token exactly once
    per_row = np.split(pos, offsets[1:-1])
    assert all(r[0] == 0 and len(r) <= 64 for r in per_row)


def test_a_source_that_trains_nothing_can_be_held_out_whole():
    hashes = [i.to_bytes(16, "little") for i in range(10)]
    assert heldout_mask(hashes, 1.0, None, seed=1, train_needed=False).all()
    assert heldout_mask(hashes, 1.0, 4, seed=1, train_needed=False).sum() == 4
    assert heldout_mask(hashes, 1.0, None, seed=1).sum() == 9

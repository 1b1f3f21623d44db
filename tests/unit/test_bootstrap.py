"""Every change against the base carries a paired bootstrap interval over documents, and a verdict says
learned, forgot or improved only when the interval is clear of 0."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from cptkit.config import Config, build_config
from cptkit.errors import ConfigError
from cptkit.eval.bootstrap import perplexity_change_interval
from cptkit.eval.results import HEADLINE_WORDING, delta_verdict, deltas


def documents(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-document (nats, tokens) of `n` documents of unlike length and difficulty."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 600, n)
    return tokens * rng.lognormal(np.log(2.5), 0.4, n), tokens


def rows(model: str, name: str, role: str, nats, tokens) -> dict:
    loss = float(np.sum(nats) / np.sum(tokens))
    return {
        "model": model,
        "set": name,
        "role": role,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": loss,
        "doc_nats": list(map(float, nats)),
        "doc_tokens": list(map(int, tokens)),
    }


def reading(role: str, nats_before, nats_after, tokens) -> tuple[dict, str]:
    (d,) = deltas(
        [rows("base", "s", role, nats_before, tokens), rows("adapted", "s", role, nats_after, tokens)]
    )
    return d, delta_verdict(d, HEADLINE_WORDING)


def test_identical_models_have_an_interval_around_zero_and_no_verdict():
    nats, tokens = documents(300)
    low, high = perplexity_change_interval(nats, tokens, nats, tokens)
    assert low <= 0 <= high
    assert reading("general", nats, nats, tokens)[1] == "no measurable forgetting (interval [+0.0%, +0.0%])"
    assert reading("domain", nats, nats, tokens)[1] == "no change within noise (±0.0%)"


def test_a_small_change_on_a_few_unlike_documents_is_within_noise():
    """What the sign alone called "no forgetting" (general) and a gain (domain): a lower loss overall,
    from documents that moved both ways, on a set of twelve."""
    nats, tokens = documents(12, seed=3)
    moved = nats * np.random.default_rng(4).normal(0.99, 0.08, len(nats))
    d, general = reading("general", nats, moved, tokens)
    assert d["loss_delta"] < 0  # the old reading: "no forgetting"
    low, high = d["perplexity_change_interval"]
    assert low < 0 < high and general == f"no measurable forgetting (interval [{low:+.1%}, {high:+.1%}])"
    assert reading("domain", nats, moved, tokens)[1].startswith("no change within noise (±")


def test_a_clear_shift_reads_learned_or_forgot_even_on_unlike_documents():
    """Paired: every document 3% harder is a clear rise however much the documents differ from each
    other (an unpaired comparison of two noisy means would not see it)."""
    nats, tokens = documents(200, seed=1)
    d, general = reading("general", nats, nats * 1.03, tokens)
    assert general == "forgot" and 0 < d["perplexity_change_interval"][0]
    assert reading("domain", nats, nats * 0.97, tokens)[1] == "learned"
    assert reading("general", nats, nats * 0.97, tokens)[1] == "improved"
    assert reading("domain", nats, nats * 1.03, tokens)[1] == "got worse"
    # the interval is of the perplexity change: every document's loss 3% higher, perplexity exp(0.03 loss) up
    expected = math.expm1(0.03 * float(np.sum(nats) / np.sum(tokens)))
    assert d["perplexity_change"] == pytest.approx(expected)
    assert d["perplexity_change_interval"][0] <= expected <= d["perplexity_change_interval"][1]


def test_more_documents_narrow_the_interval_and_the_result_is_reproducible():
    def width(n):
        nats, tokens = documents(n, seed=5)
        after = nats * np.random.default_rng(6).normal(1.0, 0.05, n)
        first = perplexity_change_interval(nats, tokens, after, tokens)
        assert perplexity_change_interval(nats, tokens, after, tokens) == first  # fixed seed
        return first.high - first.low

    assert width(2000) < width(50) / 3


def test_one_thousand_resamples_of_two_thousand_documents_take_well_under_a_second():
    nats, tokens = documents(2000)
    start = time.perf_counter()
    perplexity_change_interval(nats, tokens, nats * 1.01, tokens, resamples=1000)
    assert time.perf_counter() - start < 0.5


def test_no_interval_without_documents_to_resample_and_misuse_is_refused():
    nats, tokens = documents(5)
    assert perplexity_change_interval(nats[:1], tokens[:1], nats[:1], tokens[:1]) is None  # one document
    assert perplexity_change_interval(nats, tokens, nats, tokens, resamples=0) is None
    with pytest.raises(ValueError, match="same documents"):
        perplexity_change_interval(nats, tokens, nats[:4], tokens[:4])
    # rows without per-document numbers (an older results.json, another scorer): no interval, and the
    # verdict says only the direction
    plain = [
        {k: v for k, v in rows(m, "s", "general", n, tokens).items() if not k.startswith("doc_")}
        for m, n in (("base", nats), ("adapted", nats * 0.9))
    ]
    (d,) = deltas(plain)
    assert d["perplexity_change_interval"] is None
    assert delta_verdict(d, HEADLINE_WORDING) == "improved (no noise estimate)"


def test_eval_bootstrap_is_off_or_enough_resamples():
    assert build_config(Config, {"run_dir": "run", "eval": {"bootstrap": 0}}).eval.bootstrap == 0
    with pytest.raises(ConfigError, match="eval.bootstrap"):
        build_config(Config, {"run_dir": "run", "eval": {"bootstrap": 20}})

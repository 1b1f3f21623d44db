"""The divergence guard's decision on plain streams of logged losses and grad norms."""

from __future__ import annotations

import math

import pytest

from cptkit.config.train import GuardConfig
from cptkit.train.guard import Logged, judge

UNIFORM = math.log(512)


def stream(losses, grads=None) -> list[Logged]:
    grads = grads or [1.0] * len(losses)
    return [Logged(step, loss, grad) for step, (loss, grad) in enumerate(zip(losses, grads, strict=True), 1)]


def first_verdict(history, cfg=None, uniform=UNIFORM):
    """Feed the logs one at a time, as the callback does; the first verdict, or None."""
    cfg = cfg or GuardConfig(patience=3, window=5)
    for n in range(1, len(history) + 1):
        verdict = judge(history[:n], uniform, cfg)
        if verdict:
            return verdict
    return None


def test_a_random_start_at_the_uniform_loss_is_not_a_collapse():
    # a random model: about ln(512) for a while, a little above, then learning
    losses = [UNIFORM + 0.01, UNIFORM, UNIFORM - 0.02, UNIFORM + 0.03, UNIFORM - 0.1, 5.5, 4.8, 4.1, 3.9]
    assert first_verdict(stream(losses)) is None


def test_a_loss_back_at_the_uniform_loss_after_learning_is_a_collapse():
    losses = [6.2, 5.0, 4.0, 3.5, 3.4, UNIFORM, UNIFORM - 0.01, UNIFORM + 0.2, UNIFORM]
    verdict = first_verdict(stream(losses))
    assert (verdict.rule, verdict.since, verdict.step, verdict.last_good_step) == ("collapse", 6, 8, 5)
    assert "ln(vocabulary size)" in verdict.what
    assert first_verdict(stream(losses), GuardConfig(patience=3, window=5, enabled=False)) is None


def test_a_grad_norm_of_zero_for_patience_steps_stops():
    losses = [6.2, 6.1, 6.0, 6.0, 6.0, 6.0]
    verdict = first_verdict(stream(losses, [0.5, 0.4, 0.0, 0.0, 0.0, 0.0]))
    assert (verdict.rule, verdict.since, verdict.step, verdict.last_good_step) == ("zero_grad", 3, 5, 2)
    assert first_verdict(stream(losses[:4], [0.5, 0.0, 0.0, 0.3])) is None  # two in a row are not enough


def test_a_spike_far_above_the_running_median_for_patience_steps_stops():
    calm, big = [3.0, 2.9, 3.1, 2.8, 3.0], math.log(128256)  # spikes still under the uniform loss
    verdict = first_verdict(stream(calm + [9.5, 9.8, 9.1]), uniform=big)
    assert (verdict.rule, verdict.since, verdict.step, verdict.last_good_step) == ("spike", 6, 8, 5)
    assert "median 3.0000" in verdict.what
    assert first_verdict(stream(calm + [9.5, 2.9, 9.1, 3.0]), uniform=big) is None  # one noisy log at a time
    assert first_verdict(stream(calm + [8.5, 8.6, 8.7]), uniform=big) is None  # under 3 times the median
    assert first_verdict(stream([3.0, 2.9, 10.0, 10.0, 10.0]), uniform=big) is None  # the window is not full


def test_small_losses_that_triple_are_noise_not_a_spike():
    """Late in SFT the loss sits near 0.1: three times that is well within a batch's noise."""
    calm = [0.09, 0.1, 0.08, 0.11, 0.09]
    assert first_verdict(stream(calm + [0.31, 0.35, 0.4])) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_or_grad_norm_stops_at_once_even_with_the_guard_off(bad):
    off = GuardConfig(enabled=False)
    verdict = first_verdict(stream([6.2, 5.0, bad]), off)
    assert (verdict.rule, verdict.step, verdict.last_good_step) == ("non_finite", 3, 2)
    verdict = first_verdict(stream([6.2, 5.0], [1.0, bad]), off)
    assert verdict.rule == "non_finite" and "grad norm" in verdict.what


def test_guard_settings_are_checked():
    problems = GuardConfig(patience=0, spike_factor=1.0, window=0, uniform_margin=-1).check("train.guard")
    assert [p for p, _ in problems] == [
        "train.guard.patience",
        "train.guard.uniform_margin",
        "train.guard.spike_factor",
        "train.guard.window",
    ]

"""The recalibrated threshold is chosen with a margin (training/site/threshold.py): the true sensitivity at it
reaches the target with the stated probability, where the plain rule (sensitivity on the fitting images just
reaching the target) reaches it about half the time. Checked by simulation against a known truth: positives'
probabilities uniform on [0, 1], so the true sensitivity at threshold t is exactly 1 - t."""

from __future__ import annotations

import numpy as np
import pytest

from training.fit import choose_threshold
from training.site import threshold


def _true_sensitivity(t: float) -> float:
    return 1.0 - t


@pytest.mark.parametrize("positives", [50, 98, 300])
def test_the_margin_meets_the_target_with_the_stated_probability(positives):
    rng = np.random.default_rng(positives)
    target, confidence, runs = 0.9, 0.95, 1500
    margin, plain = [], []
    for _ in range(runs):
        p = rng.uniform(size=positives + 40)
        y = np.r_[np.ones(positives), np.zeros(40)]
        choice = threshold.choose(y, p, target, confidence)
        assert choice.met and choice.lower_bound >= target
        margin.append(_true_sensitivity(choice.threshold) >= target)
        plain.append(_true_sensitivity(choose_threshold(y, p, target)) >= target)
    # Clopper-Pearson is conservative: at least the stated 95% (allowing the simulation's own error, ~0.6%)
    assert np.mean(margin) >= confidence - 0.015, np.mean(margin)
    assert np.mean(plain) < 0.8, np.mean(plain)  # what the margin is for: the plain rule misses it often


def test_the_highest_threshold_whose_bound_reaches_the_target():
    rng = np.random.default_rng(1)
    p = rng.uniform(size=120)
    y = (np.arange(120) < 100).astype(int)
    choice = threshold.choose(y, p, 0.9, 0.95)
    positives = np.sort(p[y == 1])[::-1]
    assert choice.threshold == positives[choice.caught - 1]
    assert threshold.lower_bound(choice.caught, 100) >= 0.9 > threshold.lower_bound(choice.caught - 1, 100)
    assert choice.sensitivity > 0.9  # the margin: more than the target caught on the fitting images
    assert "Clopper-Pearson" in choice.record()["rule"]


def test_too_few_positives_catch_them_all_and_say_the_target_is_not_shown():
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.2, 0.1])
    y = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    choice = threshold.choose(y, p, 0.9, 0.95)
    assert not choice.met and choice.caught == 8 and choice.threshold == 0.35
    assert choice.lower_bound == pytest.approx(0.05 ** (1 / 8))  # all n caught: the bound is (1 - confidence)^(1/n)

"""The recalibrated threshold, chosen with a margin: the highest threshold at which a lower confidence bound of
sensitivity, not sensitivity itself, reaches the target.

Why: the highest threshold whose sensitivity on the fitting images just reaches 0.90 is, by construction, one
whose true sensitivity is about as likely below 0.90 as above (measured on site B: 0.90 on the fitting half, 0.89
on the held-out half). The one-sided Clopper-Pearson bound at `confidence` turns that into a stated probability:
the true sensitivity at the chosen threshold is at least the target with probability `confidence` (exact for a
binomial count, conservative otherwise). The price is specificity, and with few positives the target cannot be
stated at all (8 positives, every one caught: the 95% bound is 0.69); then the threshold catches every fitting
positive and the record says what the bound reached.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta

DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Choice:
    threshold: float
    positives: int  # fitting positives
    caught: int  # of them at or above the threshold
    sensitivity: float  # caught / positives
    lower_bound: float  # one-sided Clopper-Pearson lower bound of sensitivity at `confidence`
    confidence: float
    target: float
    met: bool  # lower_bound >= target; False: too few positives to state the target at this confidence

    def record(self) -> dict:
        return {**asdict(self), "rule": f"highest threshold whose one-sided {self.confidence:.0%} Clopper-Pearson "
                                        f"lower bound of sensitivity on the fitting images is >= {self.target:g}"}


def lower_bound(caught: int, positives: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower confidence bound of a proportion caught/positives."""
    if caught <= 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, caught, positives - caught + 1))


def choose(y: np.ndarray, p: np.ndarray, target: float, confidence: float = DEFAULT_CONFIDENCE) -> Choice:
    """The highest threshold t (a fitting positive's probability) whose bound for the positives scoring >= t
    reaches `target`; none reaching it: the lowest positive's probability, every positive caught."""
    if not 0.0 < target < 1.0 or not 0.5 <= confidence < 1.0:
        raise ValueError(f"target {target} must be in (0, 1) and confidence {confidence} in [0.5, 1)")
    positives = np.sort(np.asarray(p, dtype=np.float64)[np.asarray(y) == 1])[::-1]
    n = len(positives)
    if n == 0:
        raise ValueError("no osteoporosis cases to set a sensitivity-based threshold on")
    caught = np.arange(1, n + 1)  # catching the k highest
    reached = np.flatnonzero(beta.ppf(1.0 - confidence, caught, n - caught + 1) >= target)
    k = int(caught[reached[0]]) if len(reached) else n
    t = float(positives[k - 1])
    caught = int(np.sum(positives >= t))  # ties at t are caught too
    bound = lower_bound(caught, n, confidence)
    return Choice(t, n, caught, caught / n, bound, confidence, target, bound >= target)

"""Test-set metrics with patient-level bootstrap 95% intervals.

AUC is computed from probabilities, never from hard labels; the other metrics use the operating
threshold chosen on validation data. Resampling patients (not images) keeps the intervals honest
when a patient contributes several views; `threshold_bootstrap` also redraws the validation patients
that chose the threshold.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

METRICS = ("accuracy", "f1", "auc", "sensitivity", "specificity")
N_RESAMPLES = 2000  # bootstrap rounds of every interval the reports show


def metrics_at(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    pred = (p >= threshold).astype(int)
    positives, negatives = y == 1, y == 0
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "auc": float(roc_auc_score(y, p)) if len(set(y)) == 2 else float("nan"),
        "sensitivity": float(pred[positives].mean()) if positives.any() else float("nan"),
        "specificity": float(1 - pred[negatives].mean()) if negatives.any() else float("nan"),
    }


def bootstrap_ci(y: np.ndarray, p: np.ndarray, threshold: float, groups: np.ndarray,
                 n_resamples: int | None = None, seed: int = 0) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    patients = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in patients}
    samples = {m: [] for m in METRICS}
    for _ in range(n_resamples or N_RESAMPLES):
        idx = np.concatenate([members[g] for g in rng.choice(patients, size=len(patients), replace=True)])
        if len(set(y[idx])) < 2:
            continue  # AUC, sensitivity and specificity need both classes in the resample
        for name, value in metrics_at(y[idx], p[idx], threshold).items():
            samples[name].append(value)
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for name, v in samples.items()}


def threshold_bootstrap(y_val: np.ndarray, p_val: np.ndarray, groups_val: np.ndarray, y_test: np.ndarray,
                        p_test: np.ndarray, groups_test: np.ndarray, choose: Callable[[np.ndarray, np.ndarray], float],
                        n_resamples: int | None = None, seed: int = 0) -> dict[str, list[float]]:
    """95% intervals that also carry the threshold's own uncertainty.

    The operating threshold is an estimate too: it is set by the few positives of the validation split, and
    `bootstrap_ci` holds it fixed. Here each resample redraws the validation patients and re-chooses the
    threshold with `choose(y, p)`, then redraws the test patients and scores them at that threshold. Returns
    intervals for the threshold and for the threshold-dependent test metrics.
    """
    rng = np.random.default_rng(seed)
    val, test = _patients(groups_val), _patients(groups_test)
    samples: dict[str, list[float]] = {"threshold": [], "accuracy": [], "f1": [], "sensitivity": [], "specificity": []}
    for _ in range(n_resamples or N_RESAMPLES):
        v = _resample(val, rng)
        if not (y_val[v] == 1).any():
            continue  # no positive to set a sensitivity-based threshold on
        threshold = choose(y_val[v], p_val[v])
        t = _resample(test, rng)
        if len(set(y_test[t])) < 2:
            continue
        samples["threshold"].append(threshold)
        for name, value in metrics_at(y_test[t], p_test[t], threshold).items():
            if name in samples:
                samples[name].append(value)
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for name, v in samples.items()}


def _patients(groups: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(groups == g) for g in np.unique(groups)]


def _resample(patients: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([patients[i] for i in rng.integers(0, len(patients), len(patients))])

"""Test-set metrics with patient-level bootstrap 95% intervals.

AUC is computed from probabilities, never from hard labels; the other metrics use the operating
threshold chosen on validation data. Resampling patients (not images) keeps the intervals honest
when a patient contributes several views.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

METRICS = ("accuracy", "f1", "auc", "sensitivity", "specificity")


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
                 n_resamples: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    patients = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in patients}
    samples = {m: [] for m in METRICS}
    for _ in range(n_resamples):
        idx = np.concatenate([members[g] for g in rng.choice(patients, size=len(patients), replace=True)])
        if len(set(y[idx])) < 2:
            continue  # AUC, sensitivity and specificity need both classes in the resample
        for name, value in metrics_at(y[idx], p[idx], threshold).items():
            samples[name].append(value)
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for name, v in samples.items()}

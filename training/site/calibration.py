"""How far predicted probabilities are from observed rates: calibration slope and intercept, Brier score,
expected calibration error, and the reliability table behind the plot.

Slope and intercept follow the clinical convention (Van Calster et al., 2016/2019): a logistic regression of
the outcome on the logit of the prediction. The slope (< 1: predictions too extreme, > 1: too timid) comes
from the free fit; the intercept ("calibration in the large", 0 when the mean prediction matches the
prevalence) from the fit with the slope fixed at 1. A model moved to another population usually keeps its
ranking (AUC) but loses these two, which is what a site recalibration repairs.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

N_BINS = 10
# Isotonic calibrators return exactly 0 or 1 for some inputs; the logit needs a finite value.
EPS = 1e-4


def linear_predictor(p: np.ndarray) -> np.ndarray:
    return logit(np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS))


def slope(y: np.ndarray, p: np.ndarray) -> float:
    lp = linear_predictor(p).reshape(-1, 1)
    return float(LogisticRegression(C=np.inf, max_iter=1000).fit(lp, y).coef_[0, 0])


def intercept(y: np.ndarray, p: np.ndarray) -> float:
    """Calibration in the large: the intercept a with logit P(y=1) = a + logit(p), slope fixed at 1."""
    lp = linear_predictor(p)
    y = np.asarray(y, dtype=float)

    def loss(a: float) -> float:
        q = np.clip(expit(a + lp), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    return float(minimize_scalar(loss, bounds=(-20, 20), method="bounded", options={"xatol": 1e-8}).x)


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> list[dict]:
    """Equal-width probability bins: count, mean prediction and observed rate in each non-empty bin."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        inside = which == b
        if inside.any():
            rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(inside.sum()),
                         "mean_probability": float(p[inside].mean()), "observed_rate": float(y[inside].mean())})
    return rows


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error: the count-weighted mean |observed rate - mean prediction| over the bins."""
    rows = reliability(y, p, n_bins)
    total = sum(r["n"] for r in rows)
    return float(sum(r["n"] * abs(r["observed_rate"] - r["mean_probability"]) for r in rows) / total)


def summary(y: np.ndarray, p: np.ndarray) -> dict:
    y = np.asarray(y)
    both = len(set(y.tolist())) == 2  # slope and intercept need both outcomes
    return {
        "slope": slope(y, p) if both else float("nan"),
        "intercept": intercept(y, p) if both else float("nan"),
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        "ece": ece(y, p),
        "mean_probability": float(np.mean(p)),
        "observed_rate": float(np.mean(y)),
        "bins": reliability(y, p),
    }

"""Choosing and fitting the classifier on training data only: feature set, Random Forest settings,
probability calibration, and the operating threshold (on the validation split).

Every choice is made by patient-grouped cross-validation, never by the test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import RandomizedSearchCV, StratifiedGroupKFold, cross_val_predict

CV_FOLDS = 5
SEARCH_ITERATIONS = 12
DEFAULT_MIN_SENSITIVITY = 0.90  # screening: missing osteoporosis costs more than a follow-up DXA
PARAM_SPACE = {
    "n_estimators": [200, 400, 600],
    "max_depth": [None, 8, 16],
    "max_features": ["sqrt", "log2", 0.1],
    "min_samples_leaf": [1, 2, 4],
}


@dataclass
class FittedClassifier:
    model: CalibratedClassifierCV
    features: list[str]
    params: dict
    feature_scores: dict[str, float]  # grouped-CV AUC per candidate feature set
    cv_auc: float


def feature_candidates(names: list[str]) -> list[tuple[str, ...]]:
    """Each pooled layer alone, plus all layers together per pooling."""
    singles = [(n,) for n in sorted(names)]
    combos = [tuple(sorted(n for n in names if n.endswith(f"_{pool}"))) for pool in ("avg", "max")]
    return singles + [c for c in combos if len(c) > 1]


def stack(features: dict[str, np.ndarray], chosen: list[str] | tuple[str, ...]) -> np.ndarray:
    return np.concatenate([features[name] for name in chosen], axis=1)


def _folds(y: np.ndarray, groups: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    n_splits = min(CV_FOLDS, len(set(groups)))
    return list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(y, y, groups))


def _forest(seed: int, **params) -> RandomForestClassifier:
    return RandomForestClassifier(class_weight="balanced", random_state=seed, n_jobs=-1, **params)


def fit(features: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray, seed: int = 0,
        feature_sets: list[tuple[str, ...]] | None = None, search_iterations: int = SEARCH_ITERATIONS) -> FittedClassifier:
    folds = _folds(y, groups, seed)
    scores = {}
    for chosen in feature_sets or feature_candidates(list(features)):
        p = cross_val_predict(_forest(seed, n_estimators=200), stack(features, chosen), y, cv=folds, method="predict_proba")
        scores["+".join(chosen)] = float(roc_auc_score(y, p[:, 1]))
    best = max(scores, key=scores.get).split("+")
    X = stack(features, best)
    search = RandomizedSearchCV(_forest(seed), PARAM_SPACE, n_iter=search_iterations, scoring="roc_auc",
                                cv=folds, random_state=seed, n_jobs=1, refit=False)
    search.fit(X, y)
    params = search.best_params_
    # Random Forest votes are poorly calibrated (squeezed towards 0.5); isotonic needs more data than sigmoid.
    # ensemble=False: the calibrator learns from out-of-fold predictions, and one forest fitted on all the
    # training rows serves, instead of one forest per fold: five times fewer trees on every request.
    method = "isotonic" if len(y) >= 400 else "sigmoid"
    model = CalibratedClassifierCV(_forest(seed, **params), method=method, cv=folds, ensemble=False).fit(X, y)
    for calibrated in model.calibrated_classifiers_:
        calibrated.estimator.set_params(n_jobs=1)  # serving predicts small batches: thread fan-out costs more
    return FittedClassifier(model, best, params, scores, float(search.best_score_))


def choose_threshold(y: np.ndarray, p: np.ndarray, min_sensitivity: float = DEFAULT_MIN_SENSITIVITY) -> float:
    """The highest threshold whose sensitivity on validation data is at least `min_sensitivity`.

    Highest, because among thresholds that catch enough osteoporosis it keeps the most specificity.
    """
    positives = np.sort(np.asarray(p)[np.asarray(y) == 1])[::-1]
    if len(positives) == 0:
        raise ValueError("the validation split has no osteoporosis cases; cannot set a sensitivity-based threshold")
    needed = int(np.ceil(min_sensitivity * len(positives)))  # positives that must score >= threshold
    return float(positives[max(needed, 1) - 1])

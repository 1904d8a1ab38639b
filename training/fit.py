"""Choosing and fitting the classifier on training data only: feature set, Random Forest settings,
probability calibration, and the operating threshold (on the validation split).

Every choice is made by patient-grouped cross-validation, never by the test split. Augmented copies
train the forests but are never scored or calibrated on: a held-out fold is judged on its original
images only, and the calibrator learns only from original images' out-of-fold predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sklearn
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import RandomizedSearchCV, StratifiedGroupKFold, cross_val_score

CV_FOLDS = 5
SEARCH_ITERATIONS = 12
DEFAULT_MIN_SENSITIVITY = 0.90  # screening: missing osteoporosis costs more than a follow-up DXA
# Isotonic calibration is a step function with one step per distinct out-of-fold score pattern; below about a
# thousand patients it overfits them (scikit-learn's guidance) and answers few distinct values, some exactly
# 0 or 1. Counted in patients, not rows: augmented copies add no independent evidence about calibration.
ISOTONIC_MIN_PATIENTS = 1000
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
    feature_scores: dict[str, float]  # grouped-CV AUC per candidate feature set, on held-out original images
    cv_auc: float
    calibration_patients: int  # training patients whose original images the calibrator learned from


def feature_candidates(names: list[str]) -> list[tuple[str, ...]]:
    """Each pooled layer alone, plus all layers together per pooling."""
    singles = [(n,) for n in sorted(names)]
    combos = [tuple(sorted(n for n in names if n.endswith(f"_{pool}"))) for pool in ("avg", "max")]
    return singles + [c for c in combos if len(c) > 1]


def stack(features: dict[str, np.ndarray], chosen: list[str] | tuple[str, ...]) -> np.ndarray:
    return np.concatenate([features[name] for name in chosen], axis=1)


def _folds(y: np.ndarray, groups: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped folds over every row; an augmented copy carries its patient's group, so it always sits
    on its original's side."""
    n_splits = min(CV_FOLDS, len(set(groups)))
    return list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(y, y, groups))


def scoring_folds(folds: list[tuple[np.ndarray, np.ndarray]], original: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The same folds, each held-out part cut to its original images: a score over augmented copies of the
    held-out patients would count each image three times and reward the forest for recognising its own
    augmentations, not for generalising to new patients."""
    return [(train, test[original[test]]) for train, test in folds]


def _forest(seed: int, **params) -> RandomForestClassifier:
    return RandomForestClassifier(class_weight="balanced", random_state=seed, n_jobs=-1, **params)


def fit(features: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray, seed: int = 0,
        feature_sets: list[tuple[str, ...]] | None = None, search_iterations: int = SEARCH_ITERATIONS,
        original: np.ndarray | None = None) -> FittedClassifier:
    """`original[i]` is False for augmented copies (default: every row is an original image)."""
    original = np.ones(len(y), bool) if original is None else np.asarray(original, bool)
    folds = _folds(y, groups, seed)
    scored = scoring_folds(folds, original)
    scores = {}
    for chosen in feature_sets or feature_candidates(list(features)):
        fold_aucs = cross_val_score(_forest(seed, n_estimators=200), stack(features, chosen), y, cv=scored,
                                    scoring="roc_auc")
        scores["+".join(chosen)] = float(np.mean(fold_aucs))
    best = max(scores, key=scores.get).split("+")
    X = stack(features, best)
    search = RandomizedSearchCV(_forest(seed), PARAM_SPACE, n_iter=search_iterations, scoring="roc_auc",
                                cv=scored, random_state=seed, n_jobs=1, refit=False)
    search.fit(X, y)
    params = search.best_params_
    patients = len(set(groups[original]))
    model = calibrate(_forest(seed, **params), X, y, folds, original, patients)
    return FittedClassifier(model, best, params, scores, float(search.best_score_), patients)


def calibrate(forest: RandomForestClassifier, X: np.ndarray, y: np.ndarray, folds: list, original: np.ndarray,
              patients: int) -> CalibratedClassifierCV:
    """One forest on every training row, with a calibrator learned from original images only.

    Random Forest votes are poorly calibrated (squeezed towards 0.5). ensemble=False: the calibrator learns
    from out-of-fold predictions, and one forest fitted on all the training rows serves, instead of one forest
    per fold: five times fewer trees on every request. The augmented copies get calibration weight 0 and the
    forest does not request the weights (metadata routing), so they still train the forest but teach the
    calibrator nothing: what it maps must be scores of images like the ones it will see, not of copies of
    images the forest has already seen in another guise.
    """
    method = "isotonic" if patients >= ISOTONIC_MIN_PATIENTS else "sigmoid"
    with sklearn.config_context(enable_metadata_routing=True):
        forest = forest.set_fit_request(sample_weight=False)
        model = CalibratedClassifierCV(forest, method=method, cv=folds, ensemble=False)
        model.fit(X, y, sample_weight=original.astype(np.float64))
    for calibrated in model.calibrated_classifiers_:
        calibrated.estimator.set_params(n_jobs=1)  # serving predicts small batches: thread fan-out costs more
    return model


def choose_threshold(y: np.ndarray, p: np.ndarray, min_sensitivity: float = DEFAULT_MIN_SENSITIVITY) -> float:
    """The highest threshold whose sensitivity on validation data is at least `min_sensitivity`.

    Highest, because among thresholds that catch enough osteoporosis it keeps the most specificity.
    """
    positives = np.sort(np.asarray(p)[np.asarray(y) == 1])[::-1]
    if len(positives) == 0:
        raise ValueError("the validation split has no osteoporosis cases; cannot set a sensitivity-based threshold")
    needed = int(np.ceil(min_sensitivity * len(positives)))  # positives that must score >= threshold
    return float(positives[max(needed, 1) - 1])

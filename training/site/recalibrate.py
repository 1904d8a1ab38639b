"""`osteoscreen recalibrate`: a new calibrator and threshold for a site, over the parent's extractor and
forest unchanged, registered as a new version that says where it came from.

The site's images are split by patient (stratified) into a part that fits the calibrator and the threshold
and a held-out part that reports before (the parent) and after (the new version): a recalibration is only
trusted on images it was not fitted on. The forest is wrapped in scikit-learn's FrozenEstimator, so fitting
the calibrator cannot refit it; its hash and the extractor file's are recorded and checked after
registration. Sigmoid (Platt) calibration by default: two parameters, what a few hundred site images
support; isotonic needs more. The threshold is chosen with a margin (`training.site.threshold`): sensitivity
reaches the target with a stated probability, not just on the fitting images.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import StratifiedGroupKFold

from osteoscreen.errors import DataError

from training import dataset
from training.fit import DEFAULT_MIN_SENSITIVITY
from training.site import calibration, cohort as cohorts, intended, lineage, report, threshold as thresholds
from training.site.evaluate import scores

METHODS = ("sigmoid", "isotonic")


def split(cohort: cohorts.Cohort, holdout: float = 0.5, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fit, held-out) indices: stratified by label, grouped by patient."""
    n_splits = max(2, round(1 / holdout))
    patients = cohort.patients
    if len(set(patients.tolist())) < n_splits:
        raise DataError(f"only {len(set(patients.tolist()))} patients: too few to hold out a part for checking")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fit_idx, held_idx = next(folds.split(np.zeros(len(patients)), cohort.y, patients))
    for name, idx in (("fitting", fit_idx), ("held-out", held_idx)):
        if len(set(cohort.y[idx].tolist())) < 2:
            raise DataError(f"the {name} part has only one class; add images of the other class")
    return sorted(fit_idx.tolist()), sorted(held_idx.tolist())


def recalibrated(classifier, X: np.ndarray, y: np.ndarray, method: str = "sigmoid") -> CalibratedClassifierCV:
    """A calibrator fitted on (X, y) over the parent's forest, which stays frozen (same object, not a copy)."""
    forest = lineage.forest_of(classifier)
    return CalibratedClassifierCV(FrozenEstimator(forest), method=method, cv=2).fit(X, y)


def run(data_dir: Path, model_tag: str, reports: Path = Path("reports"), holdout: float = 0.5,
        method: str = "sigmoid", seed: int = 0, skip_unreadable: bool = False, force: bool = False,
        confidence: float = thresholds.DEFAULT_CONFIDENCE) -> str:
    """Images outside the parent's intended use are left out, as `evaluate` and serving leave them out
    (`force` keeps them: research use); the record says how many and why."""
    from osteoscreen.model import bundle

    if method not in METHODS:
        raise DataError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
    if not 0.1 <= holdout <= 0.9:
        raise DataError(f"--holdout {holdout}: keep between 0.1 and 0.9 of the patients for checking")
    cohort = cohorts.load(data_dir, skip_unreadable=skip_unreadable)  # bad data fails before the model loads
    split(cohort, holdout, seed)  # too few patients of a class fails here too, before the model loads
    parent = bundle.load(model_tag)
    lineage.verify(parent)
    parent_hashes = lineage.hashes(parent.tag, parent.classifier)
    X = cohorts.features(parent, cohort, parent_hashes["extractor_sha256"])
    data_fingerprint = cohort.fingerprint  # of the whole folder, as lineage records it
    cohort, X, outside_use = intended.in_use(parent, cohort, X, force)
    fit_idx, held_idx = split(cohort, holdout, seed)
    y, patients = cohort.y, cohort.patients
    target = float(parent.metadata.get("metrics", {}).get("min_sensitivity") or DEFAULT_MIN_SENSITIVITY)

    model = recalibrated(parent.classifier, X[fit_idx], y[fit_idx], method)
    choice = thresholds.choose(y[fit_idx], model.predict_proba(X[fit_idx])[:, 1], target, confidence)
    threshold = choice.threshold
    if not choice.met:
        print(f"warning: {choice.positives} fitting positives cannot show sensitivity >= {target:g} at "
              f"{confidence:.0%} confidence (the bound reached {choice.lower_bound:.3f} with every one caught); "
              "recalibrate on more osteoporosis images", file=sys.stderr)
    if lineage.forest_sha256(model) != parent_hashes["forest_sha256"]:
        raise lineage.LineageError("the forest changed while fitting the calibrator")  # FrozenEstimator forbids it

    p_before = parent.probabilities_from_features(X[held_idx])
    p_after = model.predict_proba(X[held_idx])[:, 1]
    part = lambda idx: [cohort.samples[i] for i in idx]  # noqa: E731
    record = {
        "parent": parent.tag,
        "method": f"{method} (CalibratedClassifierCV over FrozenEstimator(parent forest))",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_dir": str(cohort.root),
        "data_fingerprint": data_fingerprint,
        "intended_use": outside_use,
        "fit_fingerprint": dataset.fingerprint([cohort.hashes[i] for i in fit_idx], part(fit_idx)),
        "holdout_fingerprint": dataset.fingerprint([cohort.hashes[i] for i in held_idx], part(held_idx)),
        "holdout": holdout,
        "seed": seed,
        "n_fit": len(fit_idx),
        "n_holdout": len(held_idx),
        "class_balance": {"fit": dataset.class_balance(cohort.samples, fit_idx),
                          "holdout": dataset.class_balance(cohort.samples, held_idx)},
        "skipped": cohort.skipped,
        "min_sensitivity": target,
        "threshold_choice": choice.record(),
        **parent_hashes,
        "before": {**scores(y[held_idx], p_before, parent.threshold, patients[held_idx], seed),
                   "calibration": calibration.summary(y[held_idx], p_before)},
        "after": {**scores(y[held_idx], p_after, threshold, patients[held_idx], seed),
                  "calibration": calibration.summary(y[held_idx], p_after)},
    }
    tag = bundle.register_derived(parent.tag, model, threshold, {"recalibration": record})
    try:
        checked = lineage.verify(bundle.load(tag))  # extractor and forest, read back from the store, are the parent's
    except lineage.LineageError:
        import bentoml

        bentoml.models.delete(tag)  # never leave a version behind that claims a lineage it does not have
        raise
    record.update({"model": tag, "threshold": threshold, "lineage": checked})

    reports = Path(reports)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "recalibration.json").write_text(json.dumps(record, indent=2, allow_nan=False))
    report.reliability(reports / "recalibration_reliability.png", y[held_idx],
                       {f"before ({parent.tag})": p_before, f"after ({tag})": p_after}, "Reliability, held-out site data")
    (reports / "recalibration.md").write_text(report.recalibration_markdown(record))
    b, a = record["before"]["calibration"], record["after"]["calibration"]
    print(f"held-out ({len(held_idx)} images): ECE {b['ece']:.3f} -> {a['ece']:.3f}, Brier {b['brier']:.3f} -> "
          f"{a['brier']:.3f}, slope {b['slope']:.2f} -> {a['slope']:.2f}, intercept {b['intercept']:.2f} -> "
          f"{a['intercept']:.2f}; threshold {parent.threshold:.3f} -> {threshold:.3f} (sensitivity >= {target:g} "
          f"with {confidence:.0%} confidence: lower bound {choice.lower_bound:.3f} from {choice.caught} of "
          f"{choice.positives} fitting positives; held-out sensitivity {record['after']['sensitivity']:.3f}); "
          f"reports in {reports}", file=sys.stderr)
    return tag

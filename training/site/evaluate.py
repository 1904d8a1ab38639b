"""`osteoscreen evaluate`: a registered model, unchanged, on a site's own labelled images.

Everything a site needs before go-live, from one pass of the model over its images: the screening
metrics at the model's own threshold with patient-bootstrap intervals, calibration, the threshold this
site would need to keep sensitivity >= the model's target (chosen on the same images, so optimistic: a
reason to recalibrate on part of them and check on the rest, not a number to deploy), and subgroup tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from training import evaluate as metrics
from training.fit import DEFAULT_MIN_SENSITIVITY, choose_threshold
from osteoscreen.errors import DataError

from training.site import calibration, cohort as cohorts, intended, lineage, report, subgroups


def scores(y: np.ndarray, p: np.ndarray, threshold: float, patients: np.ndarray, seed: int = 0) -> dict:
    """Screening metrics at one threshold, with patient-bootstrap 95% intervals."""
    return {"threshold": float(threshold), **metrics.metrics_at(y, p, threshold),
            "ci95": metrics.bootstrap_ci(y, p, threshold, patients, seed=seed)}


def evaluate(model, cohort: cohorts.Cohort, p: np.ndarray, seed: int = 0) -> dict:
    """The evaluation record of `model` on `cohort`, given its probabilities `p` for the cohort's images."""
    y, patients = cohort.y, cohort.patients
    target = float(model.metadata.get("metrics", {}).get("min_sensitivity") or DEFAULT_MIN_SENSITIVITY)
    attributes = subgroups.manifest_attributes(cohort.root, cohort.samples) + subgroups.dicom_attributes(cohort.samples)
    return {
        "model": model.tag,
        "parent": model.metadata.get("parent"),
        "backbone": model.backbone,
        "data_dir": str(cohort.root),
        "data_fingerprint": cohort.fingerprint,
        "n_images": len(y),
        "n_patients": int(len(set(patients.tolist()))),
        "class_balance": cohort.balance(),
        "skipped": cohort.skipped,
        "min_sensitivity": target,
        "at_model_threshold": scores(y, p, model.threshold, patients, seed),
        "at_site_threshold": scores(y, p, choose_threshold(y, p, target), patients, seed),
        "calibration": calibration.summary(y, p),
        "subgroups": {a.name: {"source": a.source, "rows": subgroups.table(a, y, p, model.threshold, patients)}
                      for a in attributes},
    }


def run(data_dir: Path, model_tag: str | None = None, reports: Path = Path("reports"),
        skip_unreadable: bool = False, seed: int = 0, force: bool = False) -> dict:
    """`force` evaluates images outside the model's intended use too (research use); by default they are
    left out, as serving would refuse them, and counted in the record's `intended_use`."""
    from osteoscreen.model import bundle

    cohort = cohorts.load(data_dir, skip_unreadable=skip_unreadable)  # bad data fails before the model loads
    model = bundle.load(model_tag)
    checked = lineage.verify(model)  # a recalibrated version must still be its parent's extractor and forest
    sha = lineage.hashes(model.tag, model.classifier)["extractor_sha256"]
    X = cohorts.features(model, cohort, sha)
    cohort, X, outside_use = intended.in_use(model, cohort, X, force)
    p = model.probabilities_from_features(X)
    record = evaluate(model, cohort, p, seed)
    record["lineage"] = checked
    record["intended_use"] = outside_use
    reports = Path(reports)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "evaluation.json").write_text(json.dumps(record, indent=2, allow_nan=False))
    report.write_evaluation(reports, record, cohort.y, p)
    m, c = record["at_model_threshold"], record["calibration"]
    print(f"{model.tag} on {cohort.root} ({record['n_images']} images): AUC {m['auc']:.3f}, sensitivity "
          f"{m['sensitivity']:.3f}, specificity {m['specificity']:.3f} at {m['threshold']:.3f}; calibration slope "
          f"{c['slope']:.2f}, intercept {c['intercept']:.2f}, ECE {c['ece']:.3f}; reports in {reports}", file=sys.stderr)
    return record

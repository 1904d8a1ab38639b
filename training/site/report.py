"""What a site's reviewers read: evaluation.md / recalibration.md and their plots (the JSON beside them is
for tools)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import CalibrationDisplay  # noqa: E402
from sklearn.metrics import RocCurveDisplay  # noqa: E402

from training.evaluate import METRICS  # noqa: E402
from training.report import save  # noqa: E402

CALIBRATION_ROWS = (("slope", "calibration slope (1 = ideal)"), ("intercept", "calibration intercept (0 = ideal)"),
                    ("brier", "Brier score"), ("ece", "expected calibration error"),
                    ("mean_probability", "mean predicted probability"), ("observed_rate", "observed osteoporosis rate"))


def write_evaluation(reports: Path, record: dict, y: np.ndarray, p: np.ndarray) -> None:
    reliability(reports / "evaluation_reliability.png", y, {record["model"]: p}, "Reliability, site data")
    _roc(reports / "evaluation_roc.png", y, p, record)
    (reports / "evaluation.md").write_text(evaluation_markdown(record))


def reliability(path: Path, y: np.ndarray, curves: dict[str, np.ndarray], title: str) -> None:
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    for name, p in curves.items():
        CalibrationDisplay.from_predictions(y, p, n_bins=10, strategy="uniform", ax=ax, name=name)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    save(fig, path)


def _roc(path: Path, y, p, record: dict) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    RocCurveDisplay.from_predictions(y, p, ax=ax, name=record["model"])
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    for key, colour, name in (("at_model_threshold", "crimson", "model threshold"),
                              ("at_site_threshold", "darkorange", "site threshold")):
        m = record[key]
        ax.plot(1 - m["specificity"], m["sensitivity"], "o", color=colour, label=f"{name} {m['threshold']:.3f}")
    lo, hi = record["at_model_threshold"]["ci95"]["auc"]
    ax.set_title(f"ROC, site data (AUC {record['at_model_threshold']['auc']:.3f}, 95% CI {lo:.3f}-{hi:.3f})",
                 fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    save(fig, path)


def _ci(m: dict, name: str) -> str:
    lo, hi = m["ci95"][name]
    return f"{m[name]:.3f} ({lo:.3f}-{hi:.3f})"


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(value, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} (one patient)" if ci is None else f"{value:.2f} ({ci[0]:.2f}-{ci[1]:.2f})"


def subgroup_markdown(subgroups: dict) -> str:
    parts = []
    for name, table in subgroups.items():
        rows = "\n".join(
            f"| {r['value']} | {r['n']} | {r['patients']} | {r['normal']}/{r['osteoporosis']} | {r['accuracy']:.2f} | "
            f"{_interval(r['sensitivity'], r['sensitivity_ci95'])} | {_interval(r['specificity'], r['specificity_ci95'])} | "
            f"{_num(r['auc'], 2)} | {r['mean_probability']:.2f} / {r['observed_rate']:.2f} |"
            for r in table["rows"])
        parts.append(f"### {name} ({table['source']})\n\n| group | images | patients | normal/osteoporosis | accuracy | "
                     f"sensitivity (95% CI) | specificity (95% CI) | AUC | mean predicted / observed |\n"
                     f"| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n{rows}")
    return "\n\n".join(parts) or "No manifest columns beyond path, label and patient_id, and no DICOM files."


def evaluation_markdown(r: dict) -> str:
    at_model, at_site, cal = r["at_model_threshold"], r["at_site_threshold"], r["calibration"]
    rows = "\n".join(f"| {name} | {_ci(at_model, name)} | {_ci(at_site, name)} |" for name in METRICS)
    calibration_rows = "\n".join(f"| {label} | {cal[key]:.3f} |" for key, label in CALIBRATION_ROWS)
    skipped = "\n".join(f"- {s}" for s in r["skipped"]) or "none"
    lineage = ""
    if r.get("lineage"):
        lineage = (f"\nRecalibrated from **{r['lineage']['parent']}**; extractor sha256 "
                   f"`{r['lineage']['extractor_sha256'][:16]}` and forest sha256 `{r['lineage']['forest_sha256'][:16]}` "
                   "checked against the recorded (and the parent's) values.\n")
    balance = "/".join(str(v) for v in r["class_balance"].values())
    use = r.get("intended_use") or {}
    outside = (f"{use['outside']} of {use['checked']} images are outside the model's intended use "
               f"(by first failed check: {use['by_check']}); policy {use['policy']}."
               if use.get("outside") else f"All {use.get('checked', r['n_images'])} images are inside the model's intended use.")
    return f"""# Site evaluation of {r['model']}

Data `{r['data_dir']}`: {r['n_images']} images of {r['n_patients']} patients (normal/osteoporosis {balance}),
fingerprint `{r['data_fingerprint'][:16]}`. The model is used unchanged; 95% intervals resample patients.
{outside}
{lineage}
## Screening metrics

| metric | at the model's threshold {at_model['threshold']:.3f} | at the threshold this data needs {at_site['threshold']:.3f} |
| --- | --- | --- |
{rows}

The second column's threshold is the highest one with sensitivity >= {r['min_sensitivity']:.2f} on these same
images: optimistic here, and a sign of how far the operating point moved. To change it, run
`osteoscreen recalibrate`, which fits it on part of the data and reports on the rest.

## Calibration

| measure | value |
| --- | --- |
{calibration_rows}

![Reliability](evaluation_reliability.png) ![ROC](evaluation_roc.png)

## Subgroups (at the model's threshold)

Intervals are patient-bootstrap 95% intervals (patients redrawn with all their images), as for the headline
figures; small groups have wide ones, and a group of one patient has none.

{subgroup_markdown(r['subgroups'])}

Files that could not be read (excluded with --skip-unreadable): {skipped}
"""


def before_after_rows(r: dict) -> str:
    """The before/after table: the parent and the recalibrated version on the held-out part."""
    b, a = r["before"], r["after"]
    rows = [f"| threshold | {b['threshold']:.3f} | {a['threshold']:.3f} |"]
    rows += [f"| {name} | {_ci(b, name)} | {_ci(a, name)} |" for name in METRICS]
    rows += [f"| {label} | {b['calibration'][key]:.3f} | {a['calibration'][key]:.3f} |" for key, label in CALIBRATION_ROWS]
    return ("| held-out site data | before (parent) | after (recalibrated) |\n| --- | --- | --- |\n" + "\n".join(rows))


def recalibration_markdown(r: dict) -> str:
    balance = {part: "/".join(str(v) for v in counts.values()) for part, counts in r["class_balance"].items()}
    return f"""# Recalibration of {r['parent']} -> {r['model']}

Method: {r['method']}. Site data `{r['data_dir']}` (fingerprint `{r['data_fingerprint'][:16]}`), split by
patient: {r['n_fit']} images fit the calibrator and the threshold (normal/osteoporosis {balance['fit']}),
{r['n_holdout']} held-out images report below ({balance['holdout']}). {_threshold_sentence(r)} 95% intervals
resample patients.

{before_after_rows(r)}

![Reliability before and after](recalibration_reliability.png)

Extractor sha256 `{r['extractor_sha256'][:16]}` and forest sha256 `{r['forest_sha256'][:16]}`: the parent's,
recomputed from the store after registration. Serve it with `OSTEOSCREEN_MODEL_TAG={r['model']}` (it is also
the newest version, so `osteoscreen:latest`).
"""


def _threshold_sentence(r: dict) -> str:
    """How the threshold was chosen, and what it promises (records from before the margin: the plain rule)."""
    c = r.get("threshold_choice")
    if not c:
        return f"The threshold keeps sensitivity >= {r['min_sensitivity']:.2f} on the fitting part."
    promise = (f"so sensitivity is >= {c['target']:g} with probability {c['confidence']:.0%}" if c["met"] else
               f"which {c['positives']} fitting positives cannot reach: every one is caught, and the bound is only "
               f"{c['lower_bound']:.3f}; fit on more osteoporosis images")
    return (f"The threshold {c['threshold']:.3f} catches {c['caught']} of the {c['positives']} fitting positives "
            f"(sensitivity {c['sensitivity']:.3f}); their one-sided {c['confidence']:.0%} Clopper-Pearson lower bound "
            f"is {c['lower_bound']:.3f}, {promise}. Held-out sensitivity: {r['after']['sensitivity']:.3f}.")

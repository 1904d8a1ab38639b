"""What a person reads after training: metrics.json for tools, report.md and three plots for people."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import CalibrationDisplay  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from osteoscreen.types import LABELS  # noqa: E402

from training.evaluate import METRICS  # noqa: E402


def write(reports: Path, metrics: dict, y_test: np.ndarray, p_test: np.ndarray) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _roc(reports / "roc.png", y_test, p_test, metrics)
    _confusion(reports / "confusion.png", y_test, p_test, metrics["threshold"])
    _calibration(reports / "calibration.png", y_test, p_test)
    (reports / "report.md").write_text(markdown(metrics))


def save(fig: plt.Figure, path: Path) -> None:
    """Write a report figure and close it: pyplot keeps every open figure alive, and a long evaluation
    that draws many would otherwise hold them all."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _roc(path: Path, y, p, metrics) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    RocCurveDisplay.from_predictions(y, p, ax=ax, name=f"{metrics['backbone']}+RF")
    lo, hi = metrics["ci95"]["auc"]
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    ax.plot(1 - metrics["specificity"], metrics["sensitivity"], "o", color="crimson", label="operating point")
    ax.set_title(f"ROC, test split (AUC {metrics['auc']:.3f}, 95% CI {lo:.3f}-{hi:.3f})", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    save(fig, path)


def _confusion(path: Path, y, p, threshold: float) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay.from_predictions(y, (p >= threshold).astype(int), display_labels=list(LABELS), ax=ax,
                                            colorbar=False)
    ax.set_title(f"Test split at threshold {threshold:.3f}", fontsize=9)
    save(fig, path)


def _calibration(path: Path, y, p) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    CalibrationDisplay.from_predictions(y, p, n_bins=8, strategy="quantile", ax=ax, name="calibrated RF")
    ax.set_title("Calibration, test split", fontsize=9)
    save(fig, path)


def markdown(m: dict) -> str:
    rows = "\n".join(
        f"| {name} | {m[name]:.3f} | {m['ci95'][name][0]:.3f} - {m['ci95'][name][1]:.3f} |" for name in METRICS
    )
    balance = ", ".join(f"{part}: " + "/".join(str(v) for v in counts.values())
                        for part, counts in m["class_balance"].items())
    skipped = "\n".join(f"- {s}" for s in m["skipped"]) or "none"
    warned = "\n".join(f"- **{w}**" for w in m.get("data_warnings", [])) or "none"
    resampled = m["ci95_threshold_resampled"]
    wide = "\n".join(f"| {name} | {m[name]:.3f} | {lo:.3f} - {hi:.3f} |" for name, (lo, hi) in resampled.items())
    t_lo, t_hi = m["threshold_ci95"]
    return f"""# OsteoScreen training report

Backbone **{m['backbone']}** ({m['weights']} weights), features `{'+'.join(m['features'])}`, calibrated Random Forest
({m['calibration']}, {m['calibration_patients']} patients), operating threshold **{m['threshold']:.3f}** chosen on the
validation split for sensitivity >= {m['min_sensitivity']:.2f} by **{m['threshold_positives']} osteoporosis images**
({m['threshold_positive_patients']} patients): validation sensitivity {m['val_sensitivity']:.3f}, specificity
{m['val_specificity']:.3f}, AUC {m['val_auc']:.3f}. Re-chosen on resampled validation patients, the threshold
ranges over {t_lo:.3f} - {t_hi:.3f} (95%).

Split (patient-grouped, stratified): train {m['n_train']} images (+{m['n_augmented']} augmented copies),
validation {m['n_val']}, test {m['n_test']}. Class balance (normal/osteoporosis): {balance}.

## Test split (evaluated once)

| metric | value | 95% CI (patient bootstrap) |
| --- | --- | --- |
{rows}

With the threshold's own uncertainty (validation patients resampled and the threshold re-chosen in each
bootstrap round, test patients resampled too):

| metric | value | 95% CI |
| --- | --- | --- |
{wide}

The test split got {m['test_distinct_probabilities']} distinct probabilities for {m['n_test']} images,
{m['test_probabilities_at_0_or_1']} of them exactly 0 or 1.

![ROC](roc.png) ![Confusion matrix](confusion.png) ![Calibration](calibration.png)

## Choices made on training data (grouped {m['cv_folds']}-fold CV AUC, held-out folds scored on original images only)

Feature sets: {', '.join(f'`{k}` {v:.3f}' for k, v in m['feature_scores'].items())}.
Random Forest: {m['rf_params']} (CV AUC {m['cv_auc']:.3f}).

Data set fingerprint `{m['data_fingerprint'][:16]}`; weights sha256 `{m['weights_sha256'][:16]}`.

Data warnings:

{warned}

Files that could not be read: {skipped}
"""

"""Who the metrics hold for: one table per attribute of the images (every extra manifest column, and the
DICOM header's scanner, sex and age when the files are DICOM), with counts beside every figure.

Counts matter as much as the figures: a subgroup of six patients can show sensitivity 1.0 by chance, so
each row says how many images, patients and cases it rests on, and sensitivity and specificity carry
patient-bootstrap 95% intervals, as the headline figures do: a patient's views count as one patient's evidence.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from sklearn.metrics import roc_auc_score

from osteoscreen.imaging.decode import detect_format
from osteoscreen.intended_use.header import patient_age_years

from training.dataset import Sample
from training.evaluate import N_RESAMPLES

CORE_COLUMNS = {"path", "label", "patient_id"}
UNKNOWN = "unknown"
MAX_LEVELS = 12  # a column with more distinct values is binned (numbers) or skipped (identifiers)


@dataclass
class Attribute:
    name: str
    source: str  # "manifest" or "dicom"
    values: list[str]  # one per sample, in order


def manifest_attributes(root: Path, samples: list[Sample]) -> list[Attribute]:
    """Every manifest column beyond path, label and patient_id, turned into groups."""
    manifest = Path(root) / "manifest.csv"
    if not manifest.exists():
        return []
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c for c in reader.fieldnames or [] if c and c not in CORE_COLUMNS]
        rows = {(Path(root) / row["path"]).resolve(): row for row in reader}
    out = []
    for column in columns:
        raw = [(rows.get(s.path.resolve(), {}).get(column) or "").strip() for s in samples]
        values = _groups(column, raw)
        if values is not None:
            out.append(Attribute(column, "manifest", values))
    return out


def _groups(column: str, raw: list[str]) -> list[str] | None:
    """Categories as they are; ages as decade bands; other numbers in quartiles; identifiers skipped."""
    present = [v for v in raw if v]
    numbers = _numbers(present)
    if re.fullmatch(r"(patient_)?age(_years)?", column.lower()) and numbers is not None:
        return [age_band(float(v)) if v else UNKNOWN for v in raw]
    if len(set(present)) <= MAX_LEVELS:
        return [v or UNKNOWN for v in raw]
    if numbers is not None:
        edges = np.unique(np.quantile(numbers, [0.25, 0.5, 0.75]))
        labels = _bin_labels(edges, numbers)
        return [labels[int(np.searchsorted(edges, float(v), side="right"))] if v else UNKNOWN for v in raw]
    return None  # free text or an identifier: one group per image says nothing


def _numbers(values: list[str]) -> np.ndarray | None:
    try:
        return np.array([float(v) for v in values]) if values else None
    except ValueError:
        return None


def _bin_labels(edges: np.ndarray, numbers: np.ndarray) -> list[str]:
    bounds = [float(numbers.min()), *edges.tolist(), float(numbers.max())]
    return [f"q{i + 1} [{bounds[i]:g}, {bounds[i + 1]:g}{']' if i == len(bounds) - 2 else ')'}"
            for i in range(len(bounds) - 1)]


def age_band(years: float) -> str:
    decade = int(years // 10) * 10
    return f"{decade}-{decade + 9}"


def dicom_attributes(samples: list[Sample]) -> list[Attribute]:
    """Scanner (manufacturer and model), sex and age band from the DICOM headers, when any file is DICOM."""
    headers = [_header(s.path) for s in samples]
    if all(h is None for h in headers):
        return []
    not_dicom = "not DICOM"
    return [
        Attribute("scanner", "dicom", [h["scanner"] if h else not_dicom for h in headers]),
        Attribute("sex", "dicom", [h["sex"] if h else not_dicom for h in headers]),
        Attribute("age band", "dicom", [h["age_band"] if h else not_dicom for h in headers]),
    ]


def _header(path: Path) -> dict[str, str] | None:
    with open(path, "rb") as fh:
        head = fh.read(132)
    if detect_format(head) != "dicom":
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError):
        return None
    scanner = " ".join(str(ds.get(k, "")).strip() for k in ("Manufacturer", "ManufacturerModelName")).strip()
    sex = str(ds.get("PatientSex", "")).strip().upper()
    years = patient_age_years(ds)  # the intended-use checks' parser: "000Y" means removed, not age 0
    return {"scanner": scanner or UNKNOWN, "sex": sex if sex in ("F", "M", "O") else UNKNOWN,
            "age_band": age_band(years) if years is not None else UNKNOWN}


def table(attribute: Attribute, y: np.ndarray, p: np.ndarray, threshold: float, patients: np.ndarray) -> list[dict]:
    """One row per group: counts, then accuracy, sensitivity, specificity (with patient-bootstrap intervals), AUC when
    the group holds both classes, and mean prediction against the observed rate."""
    values = np.array(attribute.values)
    pred = (np.asarray(p) >= threshold).astype(int)
    rows = []
    for value, _ in sorted(Counter(attribute.values).items(), key=lambda kv: (kv[0] == UNKNOWN, kv[0])):
        m = values == value
        ym, pm, predm = y[m], p[m], pred[m]
        pos, neg = int((ym == 1).sum()), int((ym == 0).sum())
        tp, tn = int(((predm == 1) & (ym == 1)).sum()), int(((predm == 0) & (ym == 0)).sum())
        rows.append({
            "value": value, "n": int(m.sum()), "patients": int(len(set(patients[m].tolist()))),
            "normal": neg, "osteoporosis": pos,
            "accuracy": float((predm == ym).mean()),
            "sensitivity": tp / pos if pos else None,
            "sensitivity_ci95": patient_interval(predm[ym == 1] == 1, patients[m][ym == 1]) if pos else None,
            "specificity": tn / neg if neg else None,
            "specificity_ci95": patient_interval(predm[ym == 0] == 0, patients[m][ym == 0]) if neg else None,
            "auc": float(roc_auc_score(ym, pm)) if pos and neg else None,
            "mean_probability": float(pm.mean()), "observed_rate": float(ym.mean()),
        })
    return rows


def patient_interval(hits: np.ndarray, patients: np.ndarray, seed: int = 0) -> list[float] | None:
    """95% interval of the share of `hits` (one per image) from the patient bootstrap, as the headline figures'
    (`training.evaluate`): patients are redrawn, each with all of its images, so two views of one patient count
    as the evidence of one. None with fewer than two patients, where a bootstrap shows no spread it could
    honestly claim."""
    hits, patients = np.asarray(hits, dtype=float), np.asarray(patients)
    ids, index = np.unique(patients, return_inverse=True)
    if len(ids) < 2:
        return None
    k, n = np.bincount(index, weights=hits), np.bincount(index).astype(float)
    draws = np.random.default_rng(seed).multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=N_RESAMPLES)
    shares = (draws @ k) / (draws @ n)
    return [float(np.percentile(shares, 2.5)), float(np.percentile(shares, 97.5))]

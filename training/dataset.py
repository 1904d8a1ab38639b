"""A labelled folder of radiographs, and patient-grouped splits of it.

Layout: `DIR/normal/*`, `DIR/osteoporosis/*`, optional `DIR/manifest.csv` (`path,label,patient_id`).
With a manifest, all images of one patient land on the same side of every split, so the test score
is not inflated by near-duplicate views of a patient the model has already seen. Without patient ids
every image counts as its own patient, which is said loudly, and identical images are kept once, so that
no image is scored on a side of the split where the model has already seen it.
"""

from __future__ import annotations

import csv
import hashlib
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from osteoscreen.errors import DataError, ImageDecodeError
from osteoscreen.imaging.decode import load_image
from osteoscreen.intended_use.header import header_findings
from osteoscreen.intended_use.rules import IntendedUse
from osteoscreen.types import LABELS

MIN_PER_CLASS = 5


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # index into LABELS
    patient_id: str
    age: float | None = None  # years, from the manifest's optional `age` column


@dataclass
class Split:
    train: list[int]
    val: list[int]
    test: list[int]


def warn(message: str, notes: list[str] | None = None) -> None:
    """A data problem the user must see: on stderr in capitals, and kept in `notes` for the report."""
    print(f"WARNING: {message}", file=sys.stderr)
    if notes is not None:
        notes.append(message)


def load_folder(root: Path, notes: list[str] | None = None) -> list[Sample]:
    """Samples of a data folder, from its manifest when there is one, else from the class subfolders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    manifest = root / "manifest.csv"
    samples = _from_manifest(root, manifest, notes) if manifest.exists() else _from_subfolders(root, notes)
    counts = Counter(s.label for s in samples)
    for index, name in enumerate(LABELS):
        if counts[index] < MIN_PER_CLASS:
            raise DataError(f"{root}: {counts[index]} '{name}' images; at least {MIN_PER_CLASS} per class are needed")
    return samples


_ONE_PATIENT_PER_IMAGE = ("every such image counts as its own patient, so several images of one patient can land "
                          "on both sides of a split and inflate the test score")


def _from_manifest(root: Path, manifest: Path, notes: list[str] | None = None) -> list[Sample]:
    samples, missing, unnamed = [], [], []
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        absent = {"path", "label"} - set(reader.fieldnames or [])
        if absent:
            raise DataError(f"{manifest} lacks column(s) {sorted(absent)}; expected path,label,patient_id")
        has_patients = "patient_id" in (reader.fieldnames or [])
        for line, row in enumerate(reader, start=2):
            if row["label"] not in LABELS:
                raise DataError(f"{manifest}:{line}: label {row['label']!r} is not one of {LABELS}")
            path = root / row["path"]
            if not path.is_file():
                missing.append(row["path"])
                continue
            patient = (row.get("patient_id") or "").strip()
            if not patient:
                unnamed.append(row["path"])
            samples.append(Sample(path, LABELS.index(row["label"]), patient or f"image:{row['path']}",
                                  _age(row.get("age"), manifest, line)))
    if missing:
        raise DataError(f"{manifest} lists {len(missing)} missing file(s), e.g. {missing[:3]}")
    if not has_patients:
        warn(f"{manifest} has no patient_id column: {_ONE_PATIENT_PER_IMAGE}", notes)
    elif unnamed:
        warn(f"{manifest}: {len(unnamed)} of {len(samples)} rows have an empty patient_id (e.g. {unnamed[:3]}): "
             f"{_ONE_PATIENT_PER_IMAGE}", notes)
    return samples


def _age(value: str | None, manifest: Path, line: int) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{manifest}:{line}: age {value!r} is not a number of years") from None


def age_range(samples: list[Sample], indices: list[int]) -> tuple[float, float] | None:
    """The ages the training patients covered, when the manifest gives every one of them."""
    ages = [samples[i].age for i in indices]
    return (min(ages), max(ages)) if ages and all(a is not None for a in ages) else None


def _from_subfolders(root: Path, notes: list[str] | None = None) -> list[Sample]:
    warn(f"{root} has no manifest.csv with patient ids: {_ONE_PATIENT_PER_IMAGE}", notes)
    samples = []
    for index, name in enumerate(LABELS):
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"{root} has no '{name}' subfolder (expected {', '.join(LABELS)})")
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            samples.append(Sample(path, index, f"image:{path.relative_to(root)}"))
    return samples


def split(samples: list[Sample], seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> Split:
    """Stratified by label, grouped by patient: no patient appears in two parts."""
    y = np.array([s.label for s in samples])
    groups = np.array([s.patient_id for s in samples])
    idx = np.arange(len(samples))
    rest, test = _first_fold(idx, y, groups, round(1 / test_fraction), seed)
    train, val = _first_fold(rest, y[rest], groups[rest], round((1 - test_fraction) / val_fraction), seed + 1)
    return Split(train=sorted(train.tolist()), val=sorted(val.tolist()), test=sorted(test.tolist()))


def _first_fold(idx: np.ndarray, y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int):
    if len(set(groups)) < n_splits:
        raise DataError(f"only {len(set(groups))} patients: too few for a grouped {n_splits}-fold split")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    keep, held = next(folds.split(idx, y, groups))
    return idx[keep], idx[held]


def content_key(image: np.ndarray) -> str:
    """Identity of an image as the model sees it: equal for copies that differ only in file format or metadata."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def deduplicate(samples: list[Sample], images: list[np.ndarray], notes: list[str] | None = None) -> list[int]:
    """Indices to keep: the first of each set of images identical as model input (same pixels after decoding,
    whatever the file format or metadata), so that no image can be trained on and tested on at once.

    Copies under one label are kept once, and said so; copies under both labels are refused: one of the two
    labels is wrong and no split can be trusted until someone looks.
    """
    first: dict[str, int] = {}
    keep, dropped = [], []
    for i, image in enumerate(images):
        key = content_key(image)
        if key not in first:
            first[key] = i
            keep.append(i)
            continue
        original = samples[first[key]]
        if original.label != samples[i].label:
            raise DataError(f"{samples[i].path} and {original.path} are the same image but labelled "
                            f"'{LABELS[samples[i].label]}' and '{LABELS[original.label]}'; fix the labels first")
        dropped.append(f"{samples[i].path} (same image as {original.path})")
    if dropped:
        warn(f"{len(dropped)} duplicate image(s) left out, each kept once: {dropped[:3]}", notes)
    return keep


def check_disjoint(split: Split, keys: list[str]) -> None:
    """Refuse a split with one image content on two sides (an evaluation that has seen its test images)."""
    sides = {part: {keys[i] for i in getattr(split, part)} for part in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sides[a] & sides[b]
        if shared:
            raise DataError(f"{len(shared)} identical image(s) on both the {a} and the {b} side of the split")


def class_balance(samples: list[Sample], indices: list[int]) -> dict[str, int]:
    counts = Counter(samples[i].label for i in indices)
    return {name: counts[i] for i, name in enumerate(LABELS)}


def read_images(samples: list[Sample], force: bool = False) -> tuple[list[np.ndarray | None], list[str], list[str]]:
    """Decode every sample through the serving path: (model inputs, sha256 per file, problems).

    A file that fails to decode is reported and left out (None), never guessed at; so is a DICOM whose header
    says it is not a lumbar spine radiograph (another modality, body part or view: a chest film in the folder
    would teach the model, and its content check, the wrong anatomy), unless `force` (research use).
    Patient age is not checked here: the training ages are what define the model's age range.
    """
    rules = IntendedUse(age_years=(0.0, float("inf")))
    images, hashes, problems = [], [], []
    for sample in tqdm(samples, desc="reading images", unit="img"):
        data = sample.path.read_bytes()
        hashes.append(hashlib.sha256(data).hexdigest())
        findings = [] if force else header_findings(data, None, rules)
        if findings:
            images.append(None)
            problems.append(f"{sample.path}: outside the intended use: " + "; ".join(f.reason for f in findings))
            continue
        try:
            images.append(load_image(data))
        except ImageDecodeError as exc:
            images.append(None)
            problems.append(f"{sample.path}: {exc}")
    return images, hashes, problems


def fingerprint(hashes: list[str], samples: list[Sample]) -> str:
    """Identifies the exact data set a model was trained on (file contents and labels, not names)."""
    digest = hashlib.sha256()
    for h, s in sorted(zip(hashes, (s.label for s in samples))):
        digest.update(f"{h}:{s}\n".encode())
    return digest.hexdigest()

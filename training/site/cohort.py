"""A site's labelled images, read once through the serving decoder, and the registered model's features for
them (cached by image hash under the extractor's own hash, so a recalibrated version, which shares its
parent's extractor byte for byte, reuses them).

Unlike training, a validation cohort is refused when a file cannot be read: silently dropping images
changes the population being validated. `skip_unreadable=True` drops them and records which.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from osteoscreen.errors import DataError
from osteoscreen.types import LABELS

from training import dataset
from training.feature_cache import FeatureCache

BATCH = 16


@dataclass
class Cohort:
    root: Path
    samples: list[dataset.Sample]
    images: list[np.ndarray]
    hashes: list[str]
    skipped: list[str]

    @property
    def y(self) -> np.ndarray:
        return np.array([s.label for s in self.samples])

    @property
    def patients(self) -> np.ndarray:
        return np.array([s.patient_id for s in self.samples])

    @property
    def fingerprint(self) -> str:
        return dataset.fingerprint(self.hashes, self.samples)

    def balance(self) -> dict[str, int]:
        return dataset.class_balance(self.samples, list(range(len(self.samples))))

    def subset(self, indices: list[int]) -> Cohort:
        """The same cohort restricted to `indices` (e.g. the images inside the model's intended use)."""
        return Cohort(self.root, [self.samples[i] for i in indices], [self.images[i] for i in indices],
                      [self.hashes[i] for i in indices], self.skipped)


def load(root: Path, skip_unreadable: bool = False) -> Cohort:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    if not any(p.is_file() for p in root.rglob("*")):
        raise DataError(f"{root} is empty: expected {'/, '.join(LABELS)}/ subfolders of labelled images "
                        "(and optionally manifest.csv)")
    samples = dataset.load_folder(root)  # refuses a folder with fewer than MIN_PER_CLASS images of a class
    images, hashes, problems = dataset.read_images(samples, force=True)  # intended use: checked per model
    if problems and not skip_unreadable:
        listed = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DataError(f"{len(problems)} of {len(samples)} file(s) could not be read:\n  {listed}\n"
                        "fix or remove them, or pass --skip-unreadable to validate without them (they are listed "
                        "in the report)")
    for problem in problems:
        print(f"skipped unreadable file {problem}", file=sys.stderr)
    keep = [i for i, image in enumerate(images) if image is not None]
    cohort = Cohort(root, [samples[i] for i in keep], [images[i] for i in keep], [hashes[i] for i in keep], problems)
    counts = cohort.balance()
    missing = [name for name, n in counts.items() if n == 0]
    if missing:
        raise DataError(f"{root}: no readable '{missing[0]}' image; validation needs both classes "
                        f"(have {counts})")
    return cohort



def features(model, cohort: Cohort, extractor_sha256: str, indices: list[int] | None = None) -> np.ndarray:
    """(N, D) classifier inputs for the cohort's images, through the bundle's own `features_of`."""
    indices = list(range(len(cohort.samples))) if indices is None else list(indices)
    # an int8 model's features are its own stored file's: key them by that file's sha256 too
    variant = ((model.metadata.get("openvino") or {}).get("int8") or {}).get("bin_sha256") \
        if model.precision == "int8" else None
    cache = FeatureCache(f"served-{model.backbone}", extractor_sha256, model.precision, runtime=model.runtime,
                         variant=variant)
    rows: list[np.ndarray | None] = []
    for i in indices:
        hit = cache.get(cohort.hashes[i])
        rows.append(None if hit is None else hit["features"])
    todo = [k for k, row in enumerate(rows) if row is None]
    with tqdm(total=len(todo), desc=f"features ({len(rows) - len(todo)} cached)", unit="img") as bar:
        for start in range(0, len(todo), BATCH):
            chunk = todo[start:start + BATCH]
            out = model.features_of(np.stack([cohort.images[indices[k]] for k in chunk]))
            for j, k in enumerate(chunk):
                rows[k] = out[j]
                cache.put(cohort.hashes[indices[k]], {"features": out[j]})
            bar.update(len(chunk))
    return np.stack(rows).astype(np.float32)

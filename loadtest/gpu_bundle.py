"""The folder `gpu_export` writes and `gpu_torch` reads (`build/gpu`), with NumPy and the standard library only:
the export side runs where torch may be absent (torch is a test extra), the reading side where TensorFlow is."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUNDLE_FORMAT = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "extractor.npz"  # "<conv layer>.kernel" (h, w, in, out) and "<conv layer>.bias", float32
REFERENCE_FILE = "reference.npz"  # "images" (N, 224, 224, 1) and "features.<output>" (N, C), float32


@dataclass
class Bundle:
    """What gpu_export wrote: the architecture and provenance (manifest), the weights, the reference."""

    manifest: dict
    weights: dict[str, np.ndarray]
    images: np.ndarray  # (N, 224, 224, 1) float32 0..255, exactly the Keras model's input
    reference: dict[str, np.ndarray]  # feature name -> (N, C) Keras CPU float32 features of `images`


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_bundle(folder: Path) -> Bundle:
    """Read and verify a bundle: each file's sha256 against the manifest, so a truncated carry fails loudly."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{folder}: bundle format {manifest.get('format')!r}, this reader knows {BUNDLE_FORMAT}")
    for name, record in manifest["files"].items():
        actual = sha256_file(folder / name)
        if actual != record["sha256"]:
            raise ValueError(f"{folder / name}: sha256 {actual}, the manifest recorded {record['sha256']}")
    with np.load(folder / WEIGHTS_FILE) as npz:
        weights = {key: npz[key] for key in npz.files}
    with np.load(folder / REFERENCE_FILE) as npz:
        images = npz["images"]
        reference = {name: npz[f"features.{name}"] for name in manifest["outputs"]}
    return Bundle(manifest, weights, images, reference)

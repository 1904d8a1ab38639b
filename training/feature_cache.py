"""Backbone features cached on disk by (image hash, backbone, weights, runtime, compute precision), so that a second training run
with another Random Forest setting, or `compare`, does not pay for the network again."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from osteoscreen import settings


def default_root() -> Path:
    return settings.current().cache / "features"


class FeatureCache:
    def __init__(self, backbone: str, weights_id: str, precision: str, root: Path | None = None,
                 runtime: str = "tensorflow", variant: str | None = None):
        # bfloat16 features differ from float32 ones, OpenVINO's from TensorFlow's, int8 ones with the images they
        # were calibrated on (`variant`): a forest must never be fitted on a mix of them
        name = f"{backbone}-{weights_id[:16]}-{runtime}-{precision}" + (f"-{variant[:16]}" if variant else "")
        self.dir = (root or default_root()) / name

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npz"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            with np.load(path) as data:
                return {name: data[name] for name in data.files}
        except (OSError, ValueError):  # a torn write from an interrupted run: recompute it
            return None

    def put(self, key: str, features: dict[str, np.ndarray]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **features)
        os.replace(tmp, path)


def extract(extractor, keys: list[str], make_input, cache: FeatureCache, batch_size: int = 16, desc: str = "features"):
    """{feature name: (N, C)} for every key; `make_input(i)` builds input i only when it is not cached."""
    rows: list[dict[str, np.ndarray] | None] = [cache.get(k) for k in keys]
    todo = [i for i, row in enumerate(rows) if row is None]
    with tqdm(total=len(todo), desc=f"{desc} ({len(keys) - len(todo)} cached)", unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            out = extractor.predict_on_batch(np.stack([make_input(i) for i in chunk]).astype(np.float32))
            for j, i in enumerate(chunk):
                rows[i] = {name: np.asarray(value[j], dtype=np.float32) for name, value in out.items()}
                cache.put(keys[i], rows[i])
            bar.update(len(chunk))
    names = sorted(rows[0]) if rows else []
    return {name: np.stack([row[name] for row in rows]) for name in names}

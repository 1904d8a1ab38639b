"""The model bundle round-trips through the BentoML store: same predictions, full card, flat metadata."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
from sklearn.ensemble import RandomForestClassifier

from osteoscreen.model import bundle
from osteoscreen.model.backbones import AppendOnes

REPO = Path(__file__).resolve().parents[1]


def _tiny_bundle() -> bundle.ModelBundle:
    inputs = keras.Input((224, 224, 1))
    x = AppendOnes()(inputs)  # the custom layer real extractors carry must survive save/load
    extractor = keras.Model(inputs, {"block5_avg": keras.layers.GlobalAveragePooling2D()(x),
                                     "block5_max": keras.layers.GlobalMaxPooling2D()(x)})
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 4)), np.array([0, 1] * 20)
    X[y == 1] += 1.0
    forest = RandomForestClassifier(n_estimators=20, random_state=0).fit(X, y)
    metadata = {"metrics": {"auc": 0.9, "rf_params": {"max_depth": None, "max_features": 0.1}, "ci95": {"auc": [0.8, 1.0]}}}
    return bundle.ModelBundle(extractor, forest, ["block5_avg", "block5_max"], 0.4, "vgg16", metadata=metadata)


def _round_trip() -> None:
    """Runs in a fresh process: BentoML reads BENTOML_HOME once per process."""
    original = _tiny_bundle()
    batch = np.random.default_rng(1).uniform(0, 255, (3, 224, 224, 1)).astype(np.float32)
    tag = bundle.register(original)
    loaded = bundle.load(tag)
    assert loaded.tag == tag and loaded.threshold == 0.4 and loaded.features == ["block5_avg", "block5_max"]
    np.testing.assert_allclose(loaded.probabilities(batch), original.probabilities(batch), rtol=1e-6)
    assert loaded.metadata["metrics"]["rf_params"]["max_depth"] is None  # the full card keeps None
    summary = bundle.find_model(tag).info.metadata
    assert summary["backbone"] == "vgg16" and summary["auc"] == 0.9 and summary["features"] == "block5_avg+block5_max"
    assert bundle.load().tag == tag  # latest
    print("ROUND TRIP OK")


def _in_fresh_process(code: str, bentoml_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_register_and_load_round_trip(tmp_path):
    result = _in_fresh_process("import tests.test_bundle as t; t._round_trip()", tmp_path / "bentoml")
    assert result.returncode == 0 and "ROUND TRIP OK" in result.stdout, result.stderr[-3000:]


def test_missing_model_is_a_clear_error(tmp_path):
    code = "from osteoscreen.model import bundle\ntry:\n    bundle.load()\nexcept Exception as e:\n    print(type(e).__name__, e)"
    result = _in_fresh_process(code, tmp_path / "empty")
    assert result.stdout.startswith("ModelNotFoundError") and "osteoscreen train" in result.stdout, result.stderr[-2000:]

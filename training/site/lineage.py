"""What a recalibrated version must share with its parent, and the check that it does.

Recalibration may change only the calibrator and the threshold. The extractor file and the Random Forest
are the parent's, byte for byte: their sha256 are recorded when the version is made and recomputed from
the store whenever it is evaluated, so a version whose parts were swapped is refused, not validated.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.frozen import FrozenEstimator

from osteoscreen.errors import OsteoScreenError
from osteoscreen.model import bundle

from osteoscreen.model.weights import sha256_file


class LineageError(OsteoScreenError):
    """A model cannot be recalibrated, or a recalibrated version no longer matches its parent."""


def forest_of(classifier: Any) -> RandomForestClassifier:
    """The forest under the calibration: CalibratedClassifierCV(ensemble=False) holds exactly one, possibly
    wrapped in FrozenEstimator (a version that was itself recalibrated)."""
    inner = classifier
    if isinstance(inner, CalibratedClassifierCV):
        if len(inner.calibrated_classifiers_) != 1:
            raise LineageError(f"the classifier averages {len(inner.calibrated_classifiers_)} calibrated forests "
                               "(ensemble=True); recalibrating it would need one forest")
        inner = inner.calibrated_classifiers_[0].estimator
    if isinstance(inner, FrozenEstimator):
        inner = inner.estimator
    if not isinstance(inner, RandomForestClassifier):
        raise LineageError(f"expected a calibrated Random Forest, found {type(inner).__name__}")
    return inner


def forest_sha256(classifier: Any) -> str:
    """sha256 of what the forest computes: its settings and classes, and every tree's node table (features,
    thresholds, children) and leaf values. Built from the arrays, not from a pickle: a tree's node records
    carry padding bytes whose content differs between two loads of the same file."""
    forest = forest_of(classifier)
    digest = hashlib.sha256()
    params = {k: v for k, v in sorted(forest.get_params().items()) if k not in ("n_jobs", "verbose")}
    digest.update(repr(params).encode())
    digest.update(np.ascontiguousarray(forest.classes_).tobytes())
    for tree in forest.estimators_:
        state = tree.tree_.__getstate__()
        digest.update(f"{tree.tree_.n_features}:{state['node_count']}:{state['max_depth']}".encode())
        nodes = state["nodes"]
        for name in nodes.dtype.names:  # field by field: the record's padding bytes are uninitialised memory
            digest.update(np.ascontiguousarray(nodes[name]).tobytes())
        digest.update(np.ascontiguousarray(state["values"]).tobytes())
    return digest.hexdigest()


def hashes(tag: str, classifier: Any | None = None) -> dict[str, str]:
    """The two hashes of a stored version (its classifier read from the store unless given)."""
    if classifier is None:
        import joblib

        classifier = joblib.load(bundle.stored_file(tag, "classifier"))
    return {"extractor_sha256": sha256_file(bundle.stored_file(tag, "extractor")),
            "forest_sha256": forest_sha256(classifier)}


def verify(model: bundle.ModelBundle) -> dict | None:
    """For a recalibrated version: recompute the hashes and compare them with those recorded (and with the
    parent's when it is still in the store). Returns what was checked; None for a trained model."""
    record = model.metadata.get("recalibration")
    if not record:
        return None
    now = hashes(model.tag, model.classifier)
    checked = {"parent": record["parent"], **now, "matches_record": True, "matches_parent": None}
    for key, value in now.items():
        if record[key] != value:
            raise LineageError(f"{model.tag}: {key.replace('_sha256', '')} sha256 {value[:16]} differs from the "
                               f"{record[key][:16]} recorded at recalibration; this version is not its parent's model")
    if bundle.find_model(record["parent"]) is not None:
        if hashes(record["parent"]) != now:
            raise LineageError(f"{model.tag}: extractor or forest differ from the parent {record['parent']}")
        checked["matches_parent"] = True
    return checked

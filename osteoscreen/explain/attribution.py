"""From TreeSHAP values of pooled features to a map over the image that sums to the forest's output.

The classifier is a Random Forest on globally pooled CNN features, so there is no gradient to follow
(Grad-CAM does not apply). TreeSHAP (`shap.TreeExplainer`) gives each pooled feature's exact Shapley
contribution phi_c to the forest's probability, and the pooling says where on the image that feature
came from:

- an average-pooled feature is linear in its activation map, f_c = mean A_c, so phi_c spreads over the
  map in proportion to each location's share of it: phi_c * A_c(x, y) / sum A_c (uniformly when the
  map is all zero, a dead ReLU channel that then carries no location);
- a max-pooled feature is the value at one location, so phi_c goes to its argmax.

Each layer's grid is then spread over the 224x224 model input by box replication (the VGG grids 56, 28,
14 and 7 divide 224), so the map keeps its sum and its sign: sum(map) = forest output - expected value,
exactly (`tests/test_explain.py`). Positive: towards osteoporosis; negative: away from it.

The map explains the *forest's* probability; the served probability is the forest's passed through a
monotone calibrator (isotonic or sigmoid), so the signs and ranking of the map hold for it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from osteoscreen.types import INPUT_SIZE


@dataclass(frozen=True)
class Explanation:
    """One image's explanation, in the frame of the model input (224x224, the image stretched to it)."""

    attribution: np.ndarray  # float32 (224, 224): each pixel's share of forest output - expected value
    probability: float  # the calibrated probability /predict answers
    forest_output: float  # the forest's own probability of osteoporosis, what the map sums to (minus the base)
    expected_value: float  # the forest's mean output over its training data (TreeSHAP's base value)
    # the intended-use content check's score on the same features (NaN: the model has no content check), so
    # an explanation's result can say when the image is unlike the training images, as a prediction does
    content_score: float = float("nan")


def forest_and_calibrator(classifier: Any) -> tuple[Any, Any | None]:
    """The Random Forest inside the served classifier, and the calibrator applied to its output.

    Training serves `CalibratedClassifierCV(ensemble=False)`: one forest plus one calibrator. A bare
    forest (no calibration) is accepted too. Anything else has no exact TreeSHAP here: say so."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.frozen import FrozenEstimator

    if isinstance(classifier, RandomForestClassifier):
        return classifier, None
    calibrated = getattr(classifier, "calibrated_classifiers_", None)
    if calibrated and len(calibrated) == 1:
        inner = calibrated[0].estimator
        if isinstance(inner, FrozenEstimator):  # a site recalibration: a new calibrator over the parent's forest
            inner = inner.estimator
        if isinstance(inner, RandomForestClassifier):
            return inner, calibrated[0]
    raise TypeError(f"cannot explain {type(classifier).__name__}: expected a Random Forest, or one calibrated "
                    "forest (CalibratedClassifierCV with ensemble=False)")


class ForestShap:
    """Exact TreeSHAP for the positive class of a fitted forest (path-dependent: no background data set
    needed, the trees' own training counts define the expectation)."""

    def __init__(self, forest: Any) -> None:
        import shap

        self.forest = forest
        self._explainer = shap.TreeExplainer(forest)
        self._positive = list(forest.classes_).index(1) if 1 in list(forest.classes_) else len(forest.classes_) - 1
        self.expected_value = float(np.ravel(self._explainer.expected_value)[self._positive])

    def __call__(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) features -> phi (N, D) for the positive class and the forest's outputs (N,)."""
        features = np.asarray(features, dtype=np.float32)
        values = np.asarray(self._explainer.shap_values(features, check_additivity=False))
        phi = values[..., self._positive] if values.ndim == 3 else values  # shap >= 0.45: (N, D, classes)
        output = self.forest.predict_proba(features)[:, self._positive]
        return phi.astype(np.float64), output.astype(np.float64)


def feature_widths(feature_names: Sequence[str], maps: Mapping[str, np.ndarray]) -> list[int]:
    """Channels each pooled feature contributes to the classifier's input vector, in order."""
    return [int(maps[name].shape[-1]) for name in feature_names]


def spread(phi: np.ndarray, feature_names: Sequence[str], maps: Mapping[str, np.ndarray],
           size: int = INPUT_SIZE) -> np.ndarray:
    """One image's phi (D,) over its activation maps {feature name: (h, w, C)} -> float64 (size, size).

    `feature_names` are the classifier's inputs in order (e.g. ["block4_avg"]); each name ends in its
    pooling, `_avg` or `_max`, and `maps[name]` is the activation map that pooling read."""
    phi = np.asarray(phi, dtype=np.float64)
    widths = feature_widths(feature_names, maps)
    if sum(widths) != phi.shape[0]:
        raise ValueError(f"{phi.shape[0]} SHAP values for {sum(widths)} pooled features of {list(feature_names)}")
    total = np.zeros((size, size), np.float64)
    start = 0
    for name, width in zip(feature_names, widths):
        values = phi[start:start + width]
        start += width
        grid = _on_grid(values, np.asarray(maps[name], dtype=np.float64), name.rsplit("_", 1)[-1])
        total += _to_input(grid, size)
    return total


def _on_grid(phi: np.ndarray, fmap: np.ndarray, pooling: str) -> np.ndarray:
    """phi (C,) over one layer's map (h, w, C) -> (h, w) whose sum is phi's sum."""
    h, w, c = fmap.shape
    flat = fmap.reshape(h * w, c)
    if pooling == "avg":
        sums = flat.sum(axis=0)
        share = np.divide(flat, sums, out=np.full_like(flat, 1.0 / (h * w)), where=sums > 0)
        return (share @ phi).reshape(h, w)
    if pooling == "max":
        grid = np.zeros(h * w, np.float64)
        np.add.at(grid, flat.argmax(axis=0), phi)
        return grid.reshape(h, w)
    raise ValueError(f"unknown pooling {pooling!r}; expected avg or max")


def _to_input(grid: np.ndarray, size: int) -> np.ndarray:
    """Box-replicate a layer's grid onto the input, each cell's value shared by its pixels (sum kept)."""
    h, w = grid.shape
    if size % h or size % w:
        raise ValueError(f"a {h}x{w} grid does not tile a {size}x{size} input")
    fy, fx = size // h, size // w
    return np.kron(grid, np.ones((fy, fx))) / (fy * fx)


# The model service answers an explanation as one float32 array (BentoML moves numpy arrays between
# services efficiently): rows 0..223 the map, then one row [probability, forest_output, expected_value,
# content_score].
_SCALARS = 4


def pack(explanation: Explanation) -> np.ndarray:
    size = explanation.attribution.shape[1]
    tail = np.zeros((1, size), np.float32)
    tail[0, :_SCALARS] = (explanation.probability, explanation.forest_output, explanation.expected_value,
                          explanation.content_score)
    return np.concatenate([explanation.attribution.astype(np.float32), tail], axis=0)


def unpack(packed: np.ndarray) -> Explanation:
    packed = np.asarray(packed, dtype=np.float32)
    probability, forest_output, expected_value, content_score = (float(v) for v in packed[-1, :_SCALARS])
    return Explanation(packed[:-1], probability, forest_output, expected_value, content_score)

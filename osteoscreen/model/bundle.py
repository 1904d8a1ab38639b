"""The model bundle: grayscale extractor + calibrated Random Forest + operating threshold, as ONE
BentoML model.

One store entry (not a Keras model and a scikit-learn model registered apart) so that serving can
never pair an extractor with a classifier trained on another extractor's features. Metadata records
everything needed to trust and reproduce it: backbone, features, threshold, metrics, weights sha256,
data set fingerprint, training parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from osteoscreen.errors import ModelNotFoundError
from osteoscreen.types import LABELS, Prediction

MODEL_NAME = "osteoscreen"
_EXTRACTOR_FILE = "extractor.keras"
_CLASSIFIER_FILE = "classifier.joblib"
_CARD_FILE = "model_card.json"
# A screening answer is never "probability 0" or "probability 1": no model trained on a few hundred
# patients has evidence for certainty, and a clinician reading 0.0 reads "ruled out". Also keeps the
# float32 answer away from rounding to exactly 0 or 1.
PROBABILITY_BOUNDS = (0.001, 0.999)


@dataclass
class ModelBundle:
    extractor: Any  # keras.Model: (N, 224, 224, 1) intensities 0..255 -> {feature name: (N, C)}
    classifier: Any  # scikit-learn estimator with predict_proba over the concatenated features
    features: list[str]
    threshold: float
    backbone: str
    name: str = MODEL_NAME
    version: str = "unregistered"
    metadata: dict = field(default_factory=dict)

    def features_of(self, batch: np.ndarray) -> np.ndarray:
        """(N, 224, 224, 1) -> (N, D): the feature sets the classifier was trained on, in order."""
        out = self.extractor.predict_on_batch(np.asarray(batch, dtype=np.float32))
        return np.concatenate([np.asarray(out[name], dtype=np.float32) for name in self.features], axis=1)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated probability of osteoporosis for each image of the batch."""
        return screening_probability(self.classifier, self.features_of(batch))

    def predictions(self, batch: np.ndarray) -> list[Prediction]:
        return [self.prediction(float(p)) for p in self.probabilities(batch)]

    def prediction(self, probability: float) -> Prediction:
        label = LABELS[1] if probability >= self.threshold else LABELS[0]
        return Prediction(probability, label, self.threshold, self.name, self.version)

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"


def screening_probability(classifier: Any, features: np.ndarray) -> np.ndarray:
    """The classifier's calibrated probability of osteoporosis, within PROBABILITY_BOUNDS, in the float32
    that serving answers. Training chooses the threshold and evaluates through this same function: a
    threshold set at a validation case's float64 probability can sit above that case's float32 answer,
    and the case the threshold was chosen to catch would be served as normal."""
    return np.clip(classifier.predict_proba(features)[:, 1], *PROBABILITY_BOUNDS).astype(np.float32)


def register(bundle: ModelBundle) -> str:
    """Save the bundle as a new version in the BentoML model store and return its tag."""
    import bentoml
    import joblib

    card = _jsonable({"features": bundle.features, "threshold": bundle.threshold, "backbone": bundle.backbone,
                      **bundle.metadata})
    labels = {"backbone": bundle.backbone, "task": "osteoporosis-screening"}
    with bentoml.models.create(bundle.name, labels=labels, metadata=_summary(card), module="osteoscreen.model.bundle") as model:
        bundle.extractor.save(model.path_of(_EXTRACTOR_FILE))
        joblib.dump(bundle.classifier, model.path_of(_CLASSIFIER_FILE))
        Path(model.path_of(_CARD_FILE)).write_text(json.dumps(card, indent=2))
    bundle.version = model.tag.version
    return str(model.tag)


def find_model(tag: str | None = None):
    """The store entry for `tag` (default: the latest `osteoscreen` model), or None."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.get(tag or f"{MODEL_NAME}:latest")
    except (NotFound, ValueError):
        return None


def load(tag: str | None = None) -> ModelBundle:
    """Load a registered bundle; raises ModelNotFoundError with a hint when none matches."""
    import joblib
    import keras

    import osteoscreen.model.backbones  # noqa: F401 - registers the custom layer the extractor file names

    model = find_model(tag)
    if model is None:
        raise ModelNotFoundError(
            f"no registered model {tag or MODEL_NAME + ':latest'}; train one with `osteoscreen train --data DIR`"
        )
    card = json.loads(Path(model.path_of(_CARD_FILE)).read_text())
    return ModelBundle(
        extractor=keras.saving.load_model(model.path_of(_EXTRACTOR_FILE), compile=False),
        classifier=joblib.load(model.path_of(_CLASSIFIER_FILE)),
        features=list(card["features"]),
        threshold=float(card["threshold"]),
        backbone=card["backbone"],
        name=model.tag.name,
        version=model.tag.version,
        metadata=card,
    )


def _summary(card: dict) -> dict:
    """What `bentoml models get` shows: flat facts (the store's metadata takes no None or nesting);
    the full card is `model_card.json` beside the model files."""
    metrics = card.get("metrics", {})
    facts = {"backbone": card["backbone"], "features": "+".join(card["features"]), "threshold": card["threshold"]}
    for key in ("weights", "weights_sha256", "data_fingerprint", "n_train", "n_val", "n_test", "accuracy", "f1", "auc",
                "sensitivity", "specificity", "min_sensitivity"):
        if metrics.get(key) is not None:
            facts[key] = metrics[key]
    return facts


def _jsonable(value: Any) -> Any:
    """Metadata must survive YAML/JSON round trips in the store: numpy scalars become plain numbers."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))

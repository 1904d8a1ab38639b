"""The model bundle: grayscale extractor + calibrated Random Forest + operating threshold, as ONE
BentoML model.

One store entry (not a Keras model and a scikit-learn model registered apart) so that serving can
never pair an extractor with a classifier trained on another extractor's features. Metadata records
everything needed to trust and reproduce it: backbone, features, threshold, metrics, weights sha256,
data set fingerprint, training parameters.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from osteoscreen.errors import ModelNotFoundError
from osteoscreen.intended_use.rules import IntendedUse
from osteoscreen.types import ModelInfo

MODEL_NAME = "osteoscreen"
_EXTRACTOR_FILE = "extractor.keras"
_CLASSIFIER_FILE = "classifier.joblib"
_CARD_FILE = "model_card.json"
_CONTENT_CHECK_FILE = "content_check.joblib"
log = logging.getLogger("osteoscreen.model")
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
    # osteoscreen.intended_use.content.ContentCheck fitted on this model's training features; None in models
    # trained before intended-use checks existed (their content scores are NaN, which the policy treats as failed)
    content_check: Any = None
    precision: str = "float32"  # what the extractor computes in now (the card's "precision": what it was trained on)
    precision_reason: str = ""

    def features_of(self, batch: np.ndarray) -> np.ndarray:
        """(N, 224, 224, 1) -> (N, D): the feature sets the classifier was trained on, in order."""
        out = self.extractor.predict_on_batch(np.asarray(batch, dtype=np.float32))
        return np.concatenate([np.asarray(out[name], dtype=np.float32) for name in self.features], axis=1)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated probability of osteoporosis for each image of the batch."""
        return self.probabilities_from_features(self.features_of(batch))

    def probabilities_from_features(self, features: np.ndarray) -> np.ndarray:
        """The classifier half of `probabilities`, for callers that cache features (site validation)."""
        return screening_probability(self.classifier, features)

    def assess(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and content (out-of-distribution) scores, from one pass of the extractor."""
        features = self.features_of(batch)
        probabilities = self.probabilities_from_features(features)
        if self.content_check is None:
            return probabilities, np.full(len(features), np.nan, np.float32)
        return probabilities, self.content_check.scores(features)

    @property
    def intended_use(self) -> IntendedUse:
        """The model card's intended use."""
        return IntendedUse.from_dict(self.metadata.get("intended_use"))

    @property
    def clinical(self) -> bool:
        return is_clinical(self.metadata)

    @property
    def info(self) -> ModelInfo:
        """The model as answers name it (the model service's `info`)."""
        return ModelInfo(self.name, self.version, self.backbone, self.threshold,
                         self.intended_use.to_dict(), self.clinical, self.precision)

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"


def is_clinical(model_card: dict) -> bool:
    """A model is clinical only when its card records real training data; the demo phantom and cards from
    before provenance was recorded are not (their SRs say "not for clinical use")."""
    return (model_card.get("training_data") or {}).get("synthetic") is False


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
        if bundle.content_check is not None:
            joblib.dump(bundle.content_check, model.path_of(_CONTENT_CHECK_FILE))
        Path(model.path_of(_CARD_FILE)).write_text(json.dumps(card, indent=2))
    bundle.version = model.tag.version
    return str(model.tag)


def register_derived(parent_tag: str, classifier: Any, threshold: float, metadata: dict) -> str:
    """Register a new version that keeps the parent's extractor file byte for byte (copied, not re-saved,
    so its sha256 is the parent's) with a new classifier and threshold: a site recalibration. The card is
    the parent's plus `metadata`; labels and store metadata name the parent."""
    import shutil

    import bentoml
    import joblib

    parent = find_model(parent_tag)
    if parent is None:
        raise ModelNotFoundError(f"no registered model {parent_tag}")
    card = json.loads(Path(parent.path_of(_CARD_FILE)).read_text())
    card = _jsonable({**card, **metadata, "threshold": threshold, "parent": str(parent.tag)})
    labels = {**parent.info.labels, "parent": parent.tag.version}
    with bentoml.models.create(parent.tag.name, labels=labels, metadata={**_summary(card), "parent": str(parent.tag)},
                               module="osteoscreen.model.bundle") as model:
        shutil.copyfile(parent.path_of(_EXTRACTOR_FILE), model.path_of(_EXTRACTOR_FILE))
        if Path(parent.path_of(_CONTENT_CHECK_FILE)).exists():  # fitted on the same extractor's features: still valid
            shutil.copyfile(parent.path_of(_CONTENT_CHECK_FILE), model.path_of(_CONTENT_CHECK_FILE))
        joblib.dump(classifier, model.path_of(_CLASSIFIER_FILE))
        Path(model.path_of(_CARD_FILE)).write_text(json.dumps(card, indent=2))
    return str(model.tag)


def stored_file(tag: str | None, part: str) -> Path:
    """Where a registered version keeps its `extractor` or `classifier` (hashed by lineage checks)."""
    model = find_model(tag)
    if model is None:
        raise ModelNotFoundError(f"no registered model {tag or MODEL_NAME + ':latest'}")
    return Path(model.path_of({"extractor": _EXTRACTOR_FILE, "classifier": _CLASSIFIER_FILE}[part]))


def find_model(tag: str | None = None):
    """The store entry for `tag` (default: the latest `osteoscreen` model), or None."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.get(tag or f"{MODEL_NAME}:latest")
    except (NotFound, ValueError):
        return None


def card_of(tag: str | None = None) -> tuple[str, dict]:
    """(the full tag "name:version", the model card) of a registered model, without loading Keras: a batch job's
    driver pins the version every worker loads (":latest" could move mid-run) and reads the threshold and the
    intended use from it. Raises ModelNotFoundError as `load` does."""
    model = find_model(tag)
    if model is None:
        raise ModelNotFoundError(
            f"no registered model {tag or MODEL_NAME + ':latest'}; train one with `osteoscreen train --data DIR`"
        )
    return str(model.tag), json.loads(Path(model.path_of(_CARD_FILE)).read_text())


def load(tag: str | None = None, precision: str | None = None) -> ModelBundle:
    """Load a registered bundle; raises ModelNotFoundError with a hint when none matches.

    `precision` (a CLI flag; default $OSTEOSCREEN_PRECISION, else auto) picks the extractor's compute precision,
    through the numerics gate: a precision other than the one the classifier was trained on only when the
    card's recorded agreement check passed. The choice and its reason are logged and kept on the bundle.
    """
    import joblib
    import keras

    from osteoscreen.model import precision as precision_mod
    from osteoscreen.model.backbones import with_precision  # also registers the layer the extractor file names

    choice = precision_mod.choose(precision)  # a bad value fails before the slow load

    model = find_model(tag)
    if model is None:
        raise ModelNotFoundError(
            f"no registered model {tag or MODEL_NAME + ':latest'}; train one with `osteoscreen train --data DIR`"
        )
    card = json.loads(Path(model.path_of(_CARD_FILE)).read_text())
    trained = card.get("precision", precision_mod.FLOAT32)  # bundles from before precisions were float32
    served, reason = precision_mod.gate(choice, trained, card.get("precision_check"))
    log.info("model %s: extractor %s", model.tag, reason)
    extractor = keras.saving.load_model(model.path_of(_EXTRACTOR_FILE), compile=False)
    content_file = Path(model.path_of(_CONTENT_CHECK_FILE))
    return ModelBundle(
        extractor=with_precision(extractor, served),
        classifier=joblib.load(model.path_of(_CLASSIFIER_FILE)),
        features=list(card["features"]),
        threshold=float(card["threshold"]),
        backbone=card["backbone"],
        name=model.tag.name,
        version=model.tag.version,
        metadata=card,
        content_check=joblib.load(content_file) if content_file.exists() else None,
        precision=served,
        precision_reason=reason,
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
    intended = card.get("intended_use") or {}
    for key in ("content_cutoff", "content_acceptance"):
        if intended.get(key) is not None:
            facts[key] = intended[key]
    if card.get("precision"):
        facts["precision"] = card["precision"]
    check = card.get("precision_check") or {}
    for split in ("validation", "test"):  # the numerics gate's figures (validation decides; test is reported)
        figures = check.get(split)
        if figures:
            prefix = f"precision_check_{split}"
            facts[f"{prefix}_max_abs_dp"] = figures["max_abs_dp"]
            facts[f"{prefix}_label_agreement"] = figures["label_agreement"]
            for name, auc in figures["auc"].items():
                facts[f"{prefix}_auc_{name}"] = auc
    if check:
        facts["precision_check_passed"] = check["passed"]
        facts["precision_check_rule"] = check["rule"]
    return facts


def _jsonable(value: Any) -> Any:
    """Metadata must survive YAML/JSON round trips in the store: numpy scalars become plain numbers."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))

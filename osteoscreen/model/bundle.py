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
_OPENVINO_DIR = "openvino"  # extractor_float32.xml/.bin (float32 and bfloat16 compile from it), extractor_int8.xml/.bin
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
    runtime: str = "tensorflow"  # what runs the extractor now (the card's "runtime": what the forest was fitted on)
    forced: bool = False  # a combination the numerics gate refused, run by --force-precision (comparisons only)
    # what computes the features: the Keras `extractor` itself, or an openvino_runtime.OpenVINOExtractor (the Keras
    # one stays loaded for explanations, which need its gradients and activation maps)
    runner: Any = None
    # at registration only: {"float32": ov.Model, "int8": ov.Model} converted from `extractor`, stored beside it
    openvino_models: dict = field(default_factory=dict)

    def features_of(self, batch: np.ndarray) -> np.ndarray:
        """(N, 224, 224, 1) -> (N, D): the feature sets the classifier was trained on, in order."""
        out = (self.runner or self.extractor).predict_on_batch(np.asarray(batch, dtype=np.float32))
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
                         self.intended_use.to_dict(), self.clinical, self.precision, self.runtime)

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
    import shutil
    import tempfile

    import bentoml
    import joblib

    with tempfile.TemporaryDirectory(prefix="osteoscreen-openvino-") as staging:
        stored = {}
        if bundle.openvino_models:  # written first: the card (and the store's metadata) records their sha256
            from osteoscreen.model import openvino_runtime

            stored = {precision: openvino_runtime.save(ov_model, Path(staging) / f"extractor_{precision}.xml")
                      for precision, ov_model in bundle.openvino_models.items()}
        card = _jsonable({"features": bundle.features, "threshold": bundle.threshold, "backbone": bundle.backbone,
                          **bundle.metadata, **({"openvino": stored} if stored else {})})
        labels = {"backbone": bundle.backbone, "task": "osteoporosis-screening"}
        with bentoml.models.create(bundle.name, labels=labels, metadata=_summary(card),
                                   module="osteoscreen.model.bundle") as model:
            bundle.extractor.save(model.path_of(_EXTRACTOR_FILE))
            joblib.dump(bundle.classifier, model.path_of(_CLASSIFIER_FILE))
            if bundle.content_check is not None:
                joblib.dump(bundle.content_check, model.path_of(_CONTENT_CHECK_FILE))
            if stored:
                shutil.copytree(staging, model.path_of(_OPENVINO_DIR))
            Path(model.path_of(_CARD_FILE)).write_text(json.dumps(card, indent=2))
    bundle.version = model.tag.version
    bundle.metadata = card
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
        if Path(parent.path_of(_OPENVINO_DIR)).is_dir():  # the converted extractors, byte for byte as recorded
            shutil.copytree(parent.path_of(_OPENVINO_DIR), model.path_of(_OPENVINO_DIR))
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


def load(tag: str | None = None, precision: str | None = None, runtime: str | None = None,
         force: bool = False) -> ModelBundle:
    """Load a registered bundle; raises ModelNotFoundError with a hint when none matches.

    `runtime` and `precision` (CLI flags; default $OSTEOSCREEN_RUNTIME and $OSTEOSCREEN_PRECISION, else auto) pick
    what computes the features, through the numerics gate (`precision.select`): a combination other than the one
    the forest was fitted on only when the card's recorded agreement check for it passed, or with `force`
    (--force-precision, comparisons only). The choice and its reason are logged and kept on the bundle.
    """
    import joblib
    import keras

    from osteoscreen.model import precision as precision_mod
    from osteoscreen.model.backbones import with_precision  # also registers the layer the extractor file names

    precision_mod.check_request(runtime, precision)  # a bad value or combination fails before the slow load
    model = find_model(tag)
    if model is None:
        raise ModelNotFoundError(
            f"no registered model {tag or MODEL_NAME + ':latest'}; train one with `osteoscreen train --data DIR`"
        )
    card = json.loads(Path(model.path_of(_CARD_FILE)).read_text())
    selection = precision_mod.select(card, runtime, precision, force=force)
    log.info("model %s: extractor %s", model.tag, selection.reason)
    extractor = keras.saving.load_model(model.path_of(_EXTRACTOR_FILE), compile=False)
    runner = None
    if selection.runtime == precision_mod.OPENVINO:
        runner = _openvino_runner(model, card, selection.precision)
    else:
        extractor = with_precision(extractor, selection.precision)
    content_file = Path(model.path_of(_CONTENT_CHECK_FILE))
    return ModelBundle(
        extractor=extractor,
        classifier=joblib.load(model.path_of(_CLASSIFIER_FILE)),
        features=list(card["features"]),
        threshold=float(card["threshold"]),
        backbone=card["backbone"],
        name=model.tag.name,
        version=model.tag.version,
        metadata=card,
        content_check=joblib.load(content_file) if content_file.exists() else None,
        precision=selection.precision,
        precision_reason=selection.reason,
        runtime=selection.runtime,
        forced=selection.forced,
        runner=runner,
    )


def _openvino_runner(model, card: dict, precision: str):
    """The stored OpenVINO extractor compiled for `precision` (bfloat16 compiles the float32 IR), its files
    checked against the card's sha256, its compiled form cached so that a restart skips compilation."""
    from osteoscreen import settings
    from osteoscreen.model import openvino_runtime
    from osteoscreen.resources import cpu_budget

    stored = card.get("openvino") or {}
    record = stored.get("int8" if precision == "int8" else "float32")
    if record is None:
        raise ModelNotFoundError(f"model {model.tag} stores no OpenVINO {precision} extractor (registered before "
                                 "OpenVINO, or without it installed); retrain, or use --runtime tensorflow")
    ir = openvino_runtime.read(Path(model.path_of(_OPENVINO_DIR)), record)
    return openvino_runtime.OpenVINOExtractor(ir, precision, threads=max(1, int(cpu_budget())),
                                              cache_dir=settings.current().cache / "openvino")


def _openvino_summary(stored: dict) -> dict:
    return {f"openvino_{precision}_{part}_sha256": record[f"{part}_sha256"]
            for precision, record in stored.items() for part in ("xml", "bin")}


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
        facts["runtime"] = card.get("runtime", "tensorflow")
    from osteoscreen.model.precision import records

    # the numerics gate's table, one row of facts per other combination (validation decides; test is reported)
    for key, check in records(card).items():
        name = key.replace("/", "_")
        for split in ("validation", "test"):
            figures = check.get(split)
            if figures:
                prefix = f"gate_{name}_{split}"
                facts[f"{prefix}_max_abs_dp"] = figures["max_abs_dp"]
                facts[f"{prefix}_label_agreement"] = figures["label_agreement"]
                auc = figures.get("auc", {}).get(key, figures.get("auc", {}).get(key.split("/")[1]))
                if auc is not None:
                    facts[f"{prefix}_auc"] = auc
        facts[f"gate_{name}_passed"] = check["passed"]
        facts["gate_rule"] = check["rule"]
    if card.get("openvino"):
        facts.update(_openvino_summary(card["openvino"]))
    return facts


def _jsonable(value: Any) -> Any:
    """Metadata must survive YAML/JSON round trips in the store: numpy scalars become plain numbers."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))

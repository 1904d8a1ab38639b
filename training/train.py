"""`osteoscreen train`: data folder -> features -> fitted, calibrated, evaluated, registered model."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training import phantom
from osteoscreen.intended_use import rules as intended_use
from osteoscreen.imaging.decode import to_model_input
from osteoscreen.intended_use.content import ContentCheck
from osteoscreen.model import precision as precision_mod
from osteoscreen.model.bundle import screening_probability
from osteoscreen.model.specs import get_spec

from training import dataset, evaluate, fit, report
from training.augment import augment
from training.doubtful import DOUBTFUL
from training.extractors import Extractors
from training.feature_cache import extract

AUGMENT_ROUNDS = 2  # augmented copies of each training image


@dataclass
class LoadedData:
    samples: list[dataset.Sample]
    images: list[np.ndarray]
    hashes: list[str]
    skipped: list[str]
    warnings: list[str] = field(default_factory=list)  # data problems the report repeats (patient ids, duplicates)


@dataclass
class Outcome:
    metrics: dict
    fitted: fit.FittedClassifier
    reference: object  # the 3-channel keras model the extractor was folded from
    X_test: np.ndarray
    y_test: np.ndarray
    weights_id: str
    precision: str  # the extractor's compute precision the classifier was fitted on
    extractors: Extractors  # the extractor in every combination, the OpenVINO ones converted once
    runtime: str = precision_mod.TENSORFLOW  # the runtime the classifier's features came from
    p_test: np.ndarray | None = None  # set by `score_test`, the split's one use
    p_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    groups_val: np.ndarray | None = None
    groups_test: np.ndarray | None = None
    content_check: ContentCheck | None = None


def load(data_dir: Path, force: bool = False) -> LoadedData:
    notes: list[str] = []
    samples = dataset.load_folder(data_dir, notes)
    images, hashes, problems = dataset.read_images(samples, force=force)
    for problem in problems:
        print(f"skipped unreadable file {problem}", file=sys.stderr)
    readable = [i for i, image in enumerate(images) if image is not None]
    kept = dataset.deduplicate([samples[i] for i in readable], [images[i] for i in readable], notes)
    keep = [readable[k] for k in kept]
    return LoadedData([samples[i] for i in keep], [images[i] for i in keep], [hashes[i] for i in keep], problems, notes)


def make_split(data: LoadedData, seed: int = 0) -> dataset.Split:
    """The patient-grouped split, refused if one image would sit on two sides of it."""
    split = dataset.split(data.samples, seed=seed)
    dataset.check_disjoint(split, [dataset.content_key(image) for image in data.images])
    return split


def evaluate_backbone(data: LoadedData, split: dataset.Split, backbone: str, random_weights: bool = False,
                      seed: int = 0, augment_rounds: int = AUGMENT_ROUNDS,
                      search_iterations: int = fit.SEARCH_ITERATIONS, precision: str | None = None,
                      runtime: str | None = None) -> Outcome:
    """The seed's method for one backbone on a fixed split. Raises WeightsError without ImageNet weights.

    `runtime`, `precision`: what computes the features the forest is fitted on (flag values; default
    $OSTEOSCREEN_RUNTIME / $OSTEOSCREEN_PRECISION, else auto: the fastest combination this hardware runs natively).
    Fitted on the serving combination, not on the float32 reference and gated: the gate measures how far another
    combination's features move the forest's answers, and int8's move them past it (docs/results/openvino.md)."""
    import keras

    from osteoscreen.model import backbones, weights

    spec = get_spec(backbone)
    combo, why = precision_mod.training_choice(runtime, precision)
    print(f"{backbone} extractor: {why}", file=sys.stderr)
    if random_weights:
        keras.utils.set_random_seed(seed)
        weights_id, weights_sha = f"random-seed{seed}", "random"
    else:
        info = weights.provision(backbone)
        weights_id = weights_sha = info.sha256
    reference = backbones.reference_model(backbone, None if random_weights else backbones.IMAGENET)
    # int8 calibrates on the training split's original images (never validation or test ones)
    extractors = Extractors(reference, spec, weights_id, [data.images[i] for i in split.train],
                            [data.hashes[i] for i in split.train])
    extractor, cache = extractors.runner(combo), extractors.cache(combo)

    y = np.array([s.label for s in data.samples])
    groups = np.array([s.patient_id for s in data.samples])
    rows = list(split.train) + [i for r in range(augment_rounds) for i in split.train]
    keys = [data.hashes[i] for i in split.train]
    keys += [f"{data.hashes[i]}-aug{seed}-{r}" for r in range(augment_rounds) for i in split.train]

    def train_input(k: int) -> np.ndarray:
        i = rows[k]
        if k < len(split.train):
            return data.images[i]
        return augment(data.images[i], seed, k // len(split.train) - 1, data.hashes[i])

    train_feats = extract(extractor, keys, train_input, cache, desc=f"{backbone} train features")
    val_feats = extract(extractor, [data.hashes[i] for i in split.val], lambda k: data.images[split.val[k]], cache,
                        desc=f"{backbone} validation features")
    test_feats = extract(extractor, [data.hashes[i] for i in split.test], lambda k: data.images[split.test[k]], cache,
                         desc=f"{backbone} test features")

    original = np.arange(len(rows)) < len(split.train)
    fitted = fit.fit(train_feats, y[rows], groups[rows], seed=seed, search_iterations=search_iterations, original=original)
    p_val = screening_probability(fitted.model, fit.stack(val_feats, fitted.features))
    y_val = y[split.val]
    threshold = fit.choose_threshold(y_val, p_val)
    val_at = evaluate.metrics_at(y_val, p_val, threshold)
    val_positives = [i for i in split.val if y[i] == 1]
    # the content check learns what the training images look like to this model (augmented copies included:
    # they are the variation the model was taught to accept) and sets its band edges on validation images and on
    # the same images rotated and cropped
    odd = [(i, name) for name in DOUBTFUL for i in split.val]
    odd_feats = extract(extractor, [f"{data.hashes[i]}-doubtful-{name}" for i, name in odd],
                        lambda k: to_model_input(DOUBTFUL[odd[k][1]](data.images[odd[k][0]][..., 0])), cache,
                        desc=f"{backbone} rotated and cropped validation features (content check)")
    content = ContentCheck.fit(fit.stack(train_feats, fitted.features), fit.stack(val_feats, fitted.features),
                               doubtful=fit.stack(odd_feats, fitted.features))
    metrics = {
        "backbone": backbone,
        "weights": "random" if random_weights else "imagenet",
        "weights_sha256": weights_sha,
        "precision": combo.precision,
        "runtime": combo.runtime,
        "features": fitted.features,
        "n_train": len(split.train),
        "n_augmented": len(rows) - len(split.train),
        "n_val": len(split.val),
        "n_test": len(split.test),
        "threshold": threshold,
        "min_sensitivity": fit.DEFAULT_MIN_SENSITIVITY,
        # the threshold is only as good as the positives it was chosen on: say how many
        "threshold_positives": len(val_positives),
        "threshold_positive_patients": len({data.samples[i].patient_id for i in val_positives}),
        "val_auc": val_at["auc"],
        "val_sensitivity": val_at["sensitivity"],
        "val_specificity": val_at["specificity"],
        "calibration": f"{fitted.model.method} (CalibratedClassifierCV, grouped folds, original images only)",
        "calibration_patients": fitted.calibration_patients,
        "cv_folds": len(fit._folds(y[rows], groups[rows], seed)),
        "cv_auc": fitted.cv_auc,
        "cv_scored_on": "original images of the held-out patients (augmented copies train only)",
        "feature_scores": fitted.feature_scores,
        "rf_params": fitted.params,
        "class_balance": {part: dataset.class_balance(data.samples, getattr(split, part)) for part in ("train", "val", "test")},
        "skipped": data.skipped,
        "data_warnings": data.warnings,
        "seed": seed,
    }
    return Outcome(metrics, fitted, reference, fit.stack(test_feats, fitted.features), y[split.test], weights_id,
                   combo.precision, extractors, combo.runtime, p_val=p_val, y_val=y_val, groups_val=groups[split.val],
                   groups_test=groups[split.test], content_check=content)


def precision_check(data: LoadedData, split: dataset.Split, outcome: Outcome, backbone: str) -> dict:
    """The numerics gate's record: the validation (and, for the report, test) images through the extractor in
    every other combination available here, classified by the same forest, compared with the answers on the
    features it was fitted on."""
    trained = precision_mod.Combo(outcome.runtime, outcome.precision)
    others = [c for c in precision_mod.COMBOS if c != trained
              and (c.runtime != precision_mod.OPENVINO or precision_mod.openvino_installed())]
    features = outcome.fitted.features
    y = np.array([s.label for s in data.samples])
    threshold = outcome.metrics["threshold"]
    combinations = {}
    for combo in others:
        extractor, cache = outcome.extractors.runner(combo, features), outcome.extractors.cache(combo)
        figures = {}
        for part, p_trained in (("validation", outcome.p_val), ("test", outcome.p_test)):
            rows = split.val if part == "validation" else split.test
            feats = extract(extractor, [data.hashes[i] for i in rows], lambda k: data.images[rows[k]], cache,
                            desc=f"{backbone} {part} features, {combo.key} (numerics gate)")
            p_other = screening_probability(outcome.fitted.model, fit.stack(feats, features))
            figures[part] = precision_mod.agreement(p_trained, p_other, y[rows], threshold, trained.key, combo.key)
        record = combinations[combo.key] = {**precision_mod.check(figures["validation"]), "test": figures["test"]}
        v = figures["validation"]
        print(f"numerics gate ({trained.key} -> {combo.key}, validation): max |dp| {v['max_abs_dp']:.4f}, label "
              f"agreement {v['label_agreement']:.3f}, AUC {v['auc'][trained.key]:.3f} vs {v['auc'][combo.key]:.3f}: "
              f"{'passed' if record['passed'] else 'FAILED'} ({record['rule']})", file=sys.stderr)
    return {"trained": trained.key, "rule": precision_mod.RULE, "combinations": combinations}


def score_test(outcome: Outcome, seed: int = 0) -> dict:
    """The test split's one use: metrics at the validation-chosen threshold, with patient-bootstrap intervals
    (threshold held fixed, `ci95`, and re-chosen on resampled validation patients, `ci95_threshold_resampled`)."""
    m = outcome.metrics
    p_test = outcome.p_test = screening_probability(outcome.fitted.model, outcome.X_test)
    y_test, threshold = outcome.y_test, m["threshold"]
    m.update(evaluate.metrics_at(y_test, p_test, threshold))
    m["ci95"] = evaluate.bootstrap_ci(y_test, p_test, threshold, outcome.groups_test, seed=seed)
    resampled = evaluate.threshold_bootstrap(outcome.y_val, outcome.p_val, outcome.groups_val, y_test, p_test,
                                             outcome.groups_test, choose=fit.choose_threshold, seed=seed)
    m["threshold_ci95"] = resampled.pop("threshold")
    m["ci95_threshold_resampled"] = resampled
    # a step-function calibrator shows here first: few distinct answers, some exactly 0 or 1
    m["test_distinct_probabilities"] = int(len(np.unique(p_test)))
    m["test_probabilities_at_0_or_1"] = int(np.sum((p_test <= 0.0) | (p_test >= 1.0)))
    if outcome.content_check is not None:  # what the content check does with unseen in-distribution images
        scores = outcome.content_check.scores(outcome.X_test)
        m["content_test_acceptance"] = float(np.mean(scores <= outcome.content_check.cutoff))
        m["content_test_unflagged"] = float(np.mean(scores <= outcome.content_check.flag_cutoff))
    return m


def run(data_dir: Path, backbone: str = "vgg16", reports: Path = Path("reports"), random_weights: bool = False,
        seed: int = 0, register: bool = True, augment_rounds: int = AUGMENT_ROUNDS,
        search_iterations: int = fit.SEARCH_ITERATIONS, force: bool = False, precision: str | None = None,
        runtime: str | None = None) -> str:
    from osteoscreen.model import bundle

    started = time.perf_counter()
    data = load(data_dir, force=force)
    split = make_split(data, seed=seed)
    for part in ("train", "val", "test"):
        print(f"{part}: {dataset.class_balance(data.samples, getattr(split, part))}", file=sys.stderr)
    outcome = evaluate_backbone(data, split, backbone, random_weights=random_weights, seed=seed,
                                augment_rounds=augment_rounds, search_iterations=search_iterations, precision=precision,
                                runtime=runtime)
    metrics = score_test(outcome, seed=seed)
    metrics["data_fingerprint"] = dataset.fingerprint(data.hashes, data.samples)
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    report.write(reports, metrics, outcome.y_test, outcome.p_test)
    summary = ", ".join(f"{m} {metrics[m]:.3f} [{metrics['ci95'][m][0]:.3f}-{metrics['ci95'][m][1]:.3f}]"
                        for m in evaluate.METRICS)
    print(f"test: {summary}; threshold {metrics['threshold']:.3f}; reports in {reports}", file=sys.stderr)
    if not register:
        return f"not registered (--no-register); metrics in {reports / 'metrics.json'}"
    if random_weights:
        return f"not registered: random backbone weights are for ablations only; metrics in {reports / 'metrics.json'}"
    check = precision_check(data, split, outcome, backbone)
    # the float32 extractor is saved whatever the training precision: loading applies the served one; beside it the
    # OpenVINO models converted (and calibrated) in this run, the very ones the gate's figures come from
    served = outcome.extractors.keras(outcome.fitted.features)
    model = bundle.ModelBundle(served, outcome.fitted.model, outcome.fitted.features, metrics["threshold"], backbone,
                               metadata={"metrics": metrics, "input_size": 224, "class_names": ["normal", "osteoporosis"],
                                         "training_data": {"synthetic": phantom.is_phantom_set(data_dir),
                                                           "phantom_version": phantom.provenance(data_dir).get("version")},
                                         "precision": outcome.precision, "runtime": outcome.runtime,
                                         "precision_check": check,
                                         "training": {"seed": seed, "augment_rounds": augment_rounds,
                                                      "search_iterations": search_iterations,
                                                      "data_dir": str(data_dir)},
                                         "intended_use": intended_use_card(data, split, outcome)},
                               content_check=outcome.content_check,
                               openvino_models=outcome.extractors.to_store(outcome.fitted.features))
    return bundle.register(model)


def intended_use_card(data: LoadedData, split: dataset.Split, outcome: Outcome) -> dict:
    """The model card's `intended_use`: header rules, the ages the training patients covered (or the declared
    screening population when the manifest has no ages), and the content check's cut-off."""
    ages = dataset.age_range(data.samples, split.train)
    rules = intended_use.IntendedUse()
    if ages is not None:
        rules = intended_use.IntendedUse(age_years=ages, age_source=f"ages of the {len(split.train)} training patients")
    card = rules.to_dict()
    if outcome.content_check is not None:
        card.update(outcome.content_check.card())
    card["statement"] = ("Lateral lumbar spine radiographs (CR/DX) of adults, like the training images; other "
                         "body parts, views, modalities and pictures are refused or flagged.")
    return card

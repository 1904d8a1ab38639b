"""What training claims must be true of what it did: calibration learned from original images and decided
on patients, never a probability of exactly 0 or 1, cross-validation scored without augmented copies, the
threshold's own uncertainty, loud data warnings, no image on two sides of a split, and a backbone chosen
without looking at the test split. Small, fast data; no TensorFlow."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from osteoscreen.errors import DataError
from osteoscreen.model.bundle import PROBABILITY_BOUNDS, screening_probability
from training import compare, dataset, evaluate, fit, train


def _rows(n_patients: int, copies: int, seed: int = 0, signal: float = 1.0, leak: bool = False):
    """n_patients originals plus `copies` augmented rows each; features: 6 columns, the first carries `signal`.

    With `leak`, the last column equals the label on augmented rows (and is noise on originals): a shortcut
    that only the augmented copies offer."""
    rng = np.random.default_rng(seed)
    y0 = np.arange(n_patients) % 2
    X0 = rng.normal(size=(n_patients, 6))
    X0[:, 0] += signal * y0
    X = [X0] + [X0 + rng.normal(scale=0.3, size=X0.shape) for _ in range(copies)]
    X = np.concatenate(X)
    y = np.tile(y0, copies + 1)
    if leak:
        X[n_patients:, -1] = y[n_patients:]
    groups = np.tile(np.array([f"p{i}" for i in range(n_patients)]), copies + 1)
    original = np.arange(len(y)) < n_patients
    return X, y, groups, original


def test_calibration_method_is_decided_on_patients_not_augmented_rows():
    # 150 patients x 3 rows = 450 rows: the old rule (`len(y) >= 400`) chose isotonic, a step function
    X, y, groups, original = _rows(150, copies=2)
    folds = fit._folds(y, groups, 0)
    model = fit.calibrate(fit._forest(0, n_estimators=30), X, y, folds, original, patients=150)
    assert model.method == "sigmoid"
    p = screening_probability(model, X[original])
    votes = model.calibrated_classifiers_[0].estimator.predict_proba(X[original])[:, 1]
    assert len(np.unique(p)) == len(np.unique(votes))  # a strictly increasing map: no steps merge the scores
    assert fit.ISOTONIC_MIN_PATIENTS > 150


def test_calibrator_learns_from_original_images_only():
    """Augmented copies whose features are pure noise give uninformative out-of-fold scores; a calibrator that
    learned from them too would squeeze every answer towards the prevalence."""
    rng = np.random.default_rng(3)
    X, y, groups, original = _rows(120, copies=2, signal=2.0)
    X[~original] = rng.normal(size=X[~original].shape)  # copies carry no signal at all
    folds = fit._folds(y, groups, 0)
    only_originals = fit.calibrate(fit._forest(0, n_estimators=60), X, y, folds, original, patients=120)
    every_row = fit.calibrate(fit._forest(0, n_estimators=60), X, y, folds, np.ones(len(y), bool), patients=120)
    spread = {name: float(np.std(m.predict_proba(X[original])[:, 1]))
              for name, m in (("originals", only_originals), ("all", every_row))}
    assert spread["originals"] > 1.3 * spread["all"], spread
    # the forest itself still trained on every row: the weights reach the calibrator only
    forest = only_originals.calibrated_classifiers_[0].estimator
    assert forest.estimators_[0].tree_.weighted_n_node_samples[0] > original.sum()


def test_screening_probability_is_never_exactly_zero_or_one():
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    X = rng.normal(size=(200, 3)) + 10.0 * y[:, None]  # perfectly separable
    model = CalibratedClassifierCV(RandomForestClassifier(n_estimators=20, random_state=0), method="isotonic",
                                   cv=3).fit(X, y)
    raw = model.predict_proba(X)[:, 1]
    assert raw.min() == 0.0 and raw.max() == 1.0  # what an unbounded model answers here
    p = screening_probability(model, X).astype(np.float32)  # as served
    assert p.min() == np.float32(PROBABILITY_BOUNDS[0]) and p.max() == np.float32(PROBABILITY_BOUNDS[1])
    assert not np.any((p == 0.0) | (p == 1.0))


def test_cross_validation_scores_held_out_folds_on_original_images_only():
    """Augmented copies that carry a shortcut to the label would make a score over them look excellent;
    scored on original images, the weak real signal shows."""
    X, y, groups, original = _rows(80, copies=2, signal=0.6, leak=True)
    fitted = fit.fit({"block_avg": X}, y, groups, search_iterations=1, original=original)
    folds = fit._folds(y, groups, 0)
    for (train_a, test_a), (train_b, test_b) in zip(folds, fit.scoring_folds(folds, original)):
        assert np.array_equal(train_a, train_b) and original[test_b].all()
        assert set(test_b) == set(test_a[original[test_a]])
    with_copies = []
    for train_idx, test_idx in folds:
        forest = fit._forest(0, n_estimators=100).fit(X[train_idx], y[train_idx])
        with_copies.append(roc_auc_score(y[test_idx], forest.predict_proba(X[test_idx])[:, 1]))
    assert np.mean(with_copies) > 0.85  # the optimistic score the old code reported
    assert fitted.cv_auc < 0.8 and fitted.feature_scores["block_avg"] < 0.8
    assert fitted.calibration_patients == 80


def test_threshold_interval_comes_from_re_choosing_it_and_narrows_with_more_positives():
    rng = np.random.default_rng(0)
    y_test = np.arange(200) % 2
    p_test = np.clip(0.3 * y_test + rng.uniform(0, 0.7, 200), 0, 1)
    test_groups = np.arange(200).astype(str)

    def intervals(n_val: int) -> dict[str, list[float]]:
        y_val = np.arange(n_val) % 2
        p_val = np.clip(0.3 * y_val + rng.uniform(0, 0.7, n_val), 0, 1)
        ci = evaluate.threshold_bootstrap(y_val, p_val, np.arange(n_val).astype(str), y_test, p_test, test_groups,
                                          choose=fit.choose_threshold, n_resamples=400)
        chosen = fit.choose_threshold(y_val, p_val)
        assert ci["threshold"][0] <= chosen <= ci["threshold"][1]
        assert set(ci) == {"threshold", "accuracy", "f1", "sensitivity", "specificity"}
        ci["chosen"] = chosen
        return ci

    few = intervals(30)  # 15 positives choose the threshold
    many = intervals(600)
    width = {name: ci["threshold"][1] - ci["threshold"][0] for name, ci in (("few", few), ("many", many))}
    assert width["few"] > 0.02 and width["many"] < width["few"]
    # held fixed, the threshold's test sensitivity interval is narrower than with the threshold re-chosen
    fixed = evaluate.bootstrap_ci(y_test, p_test, few["chosen"], test_groups, n_resamples=400)["sensitivity"]
    assert few["sensitivity"][1] - few["sensitivity"][0] > fixed[1] - fixed[0]


def _png(pixels: np.ndarray, text: str | None = None) -> bytes:
    info = None
    if text is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", text)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _folder(root: Path, manifest: str | None, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for label in ("normal", "osteoporosis"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            (root / label / f"{i}.png").write_bytes(_png(rng.integers(0, 255, (64, 64), dtype=np.uint8)))
            rows.append((f"{label}/{i}.png", label, f"{label[0]}{i}"))
    if manifest == "no-patient-column":
        (root / "manifest.csv").write_text("path,label\n" + "".join(f"{p},{l}\n" for p, l, _ in rows))
    elif manifest == "some-empty":
        (root / "manifest.csv").write_text("path,label,patient_id\n" + "".join(
            f"{p},{l},{'' if k % 4 == 0 else g}\n" for k, (p, l, g) in enumerate(rows)))
    return root


@pytest.mark.parametrize("kind, expected", [("no-patient-column", "no patient_id column"),
                                            ("some-empty", "3 of 12 rows have an empty patient_id"),
                                            (None, "no manifest.csv with patient ids")])
def test_missing_patient_ids_are_warned_about_loudly(tmp_path, capsys, kind, expected):
    notes: list[str] = []
    samples = dataset.load_folder(_folder(tmp_path, kind), notes)
    err = capsys.readouterr().err
    assert "WARNING:" in err and expected in err and "its own patient" in err
    assert len(notes) == 1 and expected in notes[0]
    assert len({s.patient_id for s in samples}) == len(samples)


def test_a_full_manifest_gives_no_warning(tmp_path, capsys):
    root = _folder(tmp_path, None)
    (root / "manifest.csv").write_text("path,label,patient_id\n" + "".join(
        f"{label}/{i}.png,{label},pt{i % 3}\n" for label in ("normal", "osteoporosis") for i in range(6)))
    notes: list[str] = []
    samples = dataset.load_folder(root, notes)
    assert notes == [] and "WARNING" not in capsys.readouterr().err
    assert len({s.patient_id for s in samples}) == 3


def test_identical_images_are_kept_once_and_said_so(tmp_path, capsys):
    root = _folder(tmp_path, None)
    same = np.asarray(Image.open(root / "normal" / "0.png"))
    (root / "normal" / "copy.png").write_bytes(_png(same, text="re-exported"))  # other bytes, same pixels
    data = train.load(root)
    names = [s.path.name for s in data.samples]
    assert len(data.samples) == 12 and ("0.png" in names) != ("copy.png" in names)
    assert any("1 duplicate image(s) left out" in w for w in data.warnings)
    assert "WARNING: 1 duplicate" in capsys.readouterr().err
    keys = [dataset.content_key(image) for image in data.images]
    assert len(set(keys)) == len(keys)


def test_identical_images_with_both_labels_are_refused(tmp_path):
    root = _folder(tmp_path, None)
    (root / "osteoporosis" / "0.png").write_bytes((root / "normal" / "0.png").read_bytes())
    with pytest.raises(DataError, match="same image but labelled"):
        train.load(root)


def test_a_split_with_one_image_on_two_sides_is_refused():
    keys = [f"k{i}" for i in range(10)]
    split = dataset.Split(train=[0, 1, 2, 3, 4, 5], val=[6, 7], test=[8, 9])
    dataset.check_disjoint(split, keys)
    keys[9] = keys[2]
    with pytest.raises(DataError, match="train and the test side"):
        dataset.check_disjoint(split, keys)


def _outcome(backbone_auc_shift: float, seed: int) -> train.Outcome:
    """A real (small) fitted classifier and split, with validation scores shifted to rank the rows."""
    rng = np.random.default_rng(seed)
    y = np.arange(60) % 2
    X = rng.normal(size=(60, 3)) + y[:, None] * (0.5 + backbone_auc_shift)
    model = LogisticRegression().fit(X[:20], y[:20])
    p_val = screening_probability(model, X[20:40])
    threshold = fit.choose_threshold(y[20:40], p_val)
    metrics = {"threshold": threshold, "val_auc": float(roc_auc_score(y[20:40], p_val))}
    fitted = fit.FittedClassifier(model, ["f"], {}, {}, 0.0, 10)
    return train.Outcome(metrics, fitted, None, X[40:], y[40:], "weights", "float32", extractors=None, p_val=p_val,
                         y_val=y[20:40],
                         groups_val=np.arange(20).astype(str), groups_test=np.arange(20).astype(str))


def test_compare_chooses_on_validation_and_scores_only_the_chosen_row_on_test(tmp_path, monkeypatch):
    from osteoscreen.errors import WeightsError

    outcomes = {("vgg16", False): _outcome(0.0, 1), ("resnet50", False): _outcome(2.0, 2),
                ("vgg16", True): _outcome(4.0, 3)}
    for key, auc in ((("vgg16", False), 0.70), (("resnet50", False), 0.80), (("vgg16", True), 0.95)):
        outcomes[key].metrics["val_auc"] = auc  # the ablation scores best: it must still not be chosen
    scored = []

    def fake_evaluate(data, split, backbone, random_weights=False, seed=0, precision=None, runtime=None):
        assert runtime == "tensorflow"  # every backbone compared on the same runtime
        if backbone == "inceptionv3":
            raise WeightsError("no weights here")
        return outcomes[(backbone, random_weights)]

    real_score_test = train.score_test
    monkeypatch.setattr(evaluate, "N_RESAMPLES", 100)  # the intervals' width is not what this test is about
    monkeypatch.setattr(compare, "load", lambda d: SimpleNamespace(samples=[]))
    monkeypatch.setattr(compare, "make_split", lambda data, seed=0: dataset.Split([0], [1], [2]))
    monkeypatch.setattr(compare.dataset, "class_balance", lambda samples, idx: {})
    monkeypatch.setattr(compare, "evaluate_backbone", fake_evaluate)
    monkeypatch.setattr(compare, "score_test", lambda o, seed=0: scored.append(o) or real_score_test(o, seed=seed))
    table = compare.run(tmp_path, reports=tmp_path)
    assert compare.choose(outcomes) == ("resnet50", False)
    assert scored == [outcomes[("resnet50", False)]]  # the test split used once, for the chosen row
    rows = {line.split("|")[1].strip() + ("/random" if "random" in line else ""): line
            for line in table.splitlines() if line.startswith("| ") and "+ RF" in line}
    assert "chosen" in rows["resnet50 + RF"] and compare.NOT_CHOSEN not in rows["resnet50 + RF"]
    assert rows["vgg16 + RF"].count(compare.NOT_CHOSEN) == 5
    assert rows["vgg16 + RF/random"].count(compare.NOT_CHOSEN) == 5
    assert "unavailable" in rows["inceptionv3 + RF"]
    assert "accuracy" not in outcomes[("vgg16", False)].metrics and outcomes[("vgg16", False)].p_test is None

"""Training: leakage-free splits, honest metrics, and a tiny end-to-end run that registers a model
which `osteoscreen predict` then loads and uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from training import dataset, evaluate, fit

BIN = Path(sys.executable).parent


def _samples(n_patients: int = 60, seed: int = 0) -> list[dataset.Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_patients):
        label = int(rng.random() < 0.4)
        for v in range(rng.integers(1, 4)):  # 1-3 views per patient
            out.append(dataset.Sample(Path(f"p{p}_v{v}.png"), label, f"p{p}"))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_has_no_patient_on_two_sides(seed):
    samples = _samples(seed=seed)
    split = dataset.split(samples, seed=seed)
    parts = {name: {samples[i].patient_id for i in getattr(split, name)} for name in ("train", "val", "test")}
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
    assert sorted(split.train + split.val + split.test) == list(range(len(samples)))
    for name in ("val", "test"):
        balance = dataset.class_balance(samples, getattr(split, name))
        assert balance["normal"] > 0 and balance["osteoporosis"] > 0


def test_auc_comes_from_probabilities_not_hard_labels():
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.45, 0.9])
    threshold = 0.6  # a bad threshold: hard labels lose most of the ranking
    m = evaluate.metrics_at(y, p, threshold)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["auc"] != pytest.approx(roc_auc_score(y, (p >= threshold).astype(int)))
    assert m["sensitivity"] == pytest.approx(0.25) and m["specificity"] == pytest.approx(1.0)


def test_bootstrap_interval_contains_the_point_estimate_and_narrows_with_data():
    rng = np.random.default_rng(0)

    def ci(n):
        y = rng.integers(0, 2, n)
        p = np.clip(y * 0.3 + rng.uniform(0, 0.7, n), 0, 1)
        groups = np.arange(n).astype(str)
        m = evaluate.metrics_at(y, p, 0.5)
        c = evaluate.bootstrap_ci(y, p, 0.5, groups, n_resamples=400)
        assert c["auc"][0] <= m["auc"] <= c["auc"][1]
        return c["auc"][1] - c["auc"][0]

    assert ci(400) < ci(40)


def test_threshold_meets_the_sensitivity_target_on_validation_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.35 * y + rng.uniform(0, 0.65, 200), 0, 1)
    t = fit.choose_threshold(y, p, min_sensitivity=0.9)
    assert (p[y == 1] >= t).mean() >= 0.9
    assert (p[y == 1] >= t + 1e-6).mean() < 0.9 or t >= p.max()  # the highest such threshold


def test_folder_without_enough_images_is_refused(tmp_path):
    from osteoscreen.errors import DataError

    (tmp_path / "normal").mkdir()
    (tmp_path / "osteoporosis").mkdir()
    (tmp_path / "normal" / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match="at least 5 per class"):
        dataset.load_folder(tmp_path)


@pytest.fixture(scope="module")
def trained(registered_model):
    return registered_model["root"], registered_model["env"], registered_model


def test_train_registers_a_model_and_writes_reports(trained):
    root, env, model = trained
    tag = model["tag"]
    assert tag.startswith("osteoscreen:")
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    for key in ("backbone", "n_train", "n_test", "accuracy", "f1", "auc", "sensitivity", "specificity", "threshold"):
        assert key in metrics
    assert metrics["backbone"] == "vgg16" and metrics["weights"] == "imagenet"
    assert all(lo <= metrics[m] <= hi for m, (lo, hi) in metrics["ci95"].items())
    assert any("zz_corrupt.png" in s for s in metrics["skipped"])
    # a model that learned something, calibrated without steps, and a threshold whose uncertainty is reported
    assert metrics["auc"] > 0.5 and metrics["cv_auc"] > 0.5
    assert metrics["calibration"].startswith("sigmoid") and metrics["calibration_patients"] <= metrics["n_train"]
    assert metrics["test_probabilities_at_0_or_1"] == 0
    assert metrics["test_distinct_probabilities"] >= metrics["n_test"] - 2
    assert metrics["threshold_ci95"][0] <= metrics["threshold"] <= metrics["threshold_ci95"][1]
    assert metrics["threshold_positives"] > 0 and "osteoporosis images" in (root / "reports" / "report.md").read_text()
    for name in ("report.md", "roc.png", "confusion.png", "calibration.png"):
        assert (root / "reports" / name).stat().st_size > 500


def test_the_threshold_meets_its_sensitivity_target_on_validation_and_test_auc_is_what_serving_gives(trained):
    """Recomputed from the served model's own answers on the split's images, not read back from metrics.json."""
    from training import train

    root, env, _ = trained
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    data = train.load(root / "data")
    split = train.make_split(data, seed=metrics["seed"])
    files = [str(data.samples[i].path) for i in split.val + split.test]
    # --force: the threshold and AUC are about every split image; the content check may refuse an unseen one
    # (it aims at 99% acceptance), and tests/test_intended_use_e2e.py is where that is checked
    result = subprocess.run([str(BIN / "osteoscreen"), "predict", "--force", *files], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = {line["path"]: line for line in map(json.loads, result.stdout.splitlines())}
    y = {str(s.path): s.label for s in data.samples}
    val_pos = [answers[f]["label"] for f in files[:len(split.val)] if y[f] == 1]
    assert len(val_pos) == metrics["threshold_positives"]
    assert val_pos.count("osteoporosis") / len(val_pos) >= metrics["min_sensitivity"]  # as served, labels included
    test = files[len(split.val):]
    auc = roc_auc_score([y[f] for f in test], [answers[f]["probability"] for f in test])
    assert auc > 0.5 and auc == pytest.approx(metrics["auc"], abs=0.05)
    assert all(0.0 < a["probability"] < 1.0 for a in answers.values())


@pytest.mark.slow
def test_second_run_reuses_cached_features(trained):
    root, env, _ = trained
    result = subprocess.run(
        [str(BIN / "osteoscreen"), "train", "--data", str(root / "data"), "--reports", str(root / "reports2"),
         "--augment-rounds", "1", "--search-iterations", "2", "--no-register"],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(0 cached)" not in result.stderr and "cached)" in result.stderr
    first = json.loads((root / "reports" / "metrics.json").read_text())
    second = json.loads((root / "reports2" / "metrics.json").read_text())
    assert first["auc"] == second["auc"]  # same data, same seed, same cached features


def test_predict_uses_the_registered_model_and_reports_bad_files(trained):
    root, env, _ = trained
    good = sorted((root / "data" / "osteoporosis").glob("*.png"))[:2]
    bad = root / "not-an-image.png"
    bad.write_bytes(b"hello")
    result = subprocess.run([str(BIN / "osteoscreen"), "predict", str(good[0]), str(bad), str(good[1])],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(good[0]), str(good[1])]
    for line in lines:
        assert 0.0 <= line["probability"] <= 1.0
        assert line["label"] == ("osteoporosis" if line["probability"] >= line["threshold"] else "normal")
        assert line["model"].startswith("osteoscreen:")
    errors = [line for line in result.stderr.splitlines() if "not-an-image.png: error:" in line]
    assert len(errors) == 1


def test_training_refuses_without_pretrained_weights(tmp_path, trained):
    root, env, _ = trained
    env = {**env, "KERAS_HOME": str(tmp_path / "empty-keras"), "OSTEOSCREEN_KERAS_DOWNLOAD": "0",
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    result = subprocess.run(
        [str(BIN / "osteoscreen"), "train", "--data", str(root / "data"), "--reports", str(tmp_path / "r"),
         "--no-register"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "error:" in result.stderr and "weights" in result.stderr
    assert not (tmp_path / "r" / "metrics.json").exists()

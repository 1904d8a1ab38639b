"""Site validation end to end with the real model: `osteoscreen evaluate` on a shifted-site phantom gives the
metrics one computes independently from `osteoscreen predict`; `osteoscreen recalibrate` lowers the held-out
calibration error, keeps the parent's extractor file and forest, records its parent, and the new version
loads, evaluates and serves with nothing new.

Runs on a copy of the session's model store, so the versions made here never become another test's
`osteoscreen:latest`."""

from __future__ import annotations

import csv
import filecmp
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, brier_score_loss, f1_score, recall_score, roc_auc_score

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow  # each test trains or evaluates on a site set


def _run(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "osteoscreen"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def site(registered_model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(registered_model["root"] / "bentoml", root / "bentoml")
    env = {**registered_model["env"], "BENTOML_HOME": str(root / "bentoml"), "OSTEOSCREEN_CACHE": str(root / "cache")}
    _run(["synth", "--out", str(root / "data"), "--n", "80", "--seed", "11", "--site", "B"], env)
    with open(root / "data" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {"root": root, "env": env, "parent": registered_model["tag"], "rows": rows}


def _store(site: dict, tag: str) -> Path:
    name, version = tag.split(":")
    return site["root"] / "bentoml" / "models" / name / version


def test_evaluate_matches_metrics_computed_from_predict(site):
    root, env, rows = site["root"], site["env"], site["rows"]
    _run(["evaluate", "--data", str(root / "data"), "--model", site["parent"], "--reports", str(root / "eval"),
          "--force"], env)  # every image, as predict --force answers them all
    record = json.loads((root / "eval" / "evaluation.json").read_text())
    files = [str(root / "data" / r["path"]) for r in rows]
    out = _run(["predict", "--force", "--model", site["parent"], *files], env).stdout
    p = np.array([json.loads(line)["probability"] for line in out.splitlines()])
    y = np.array([int(r["label"] == "osteoporosis") for r in rows])
    pred = (p >= record["at_model_threshold"]["threshold"]).astype(int)

    m = record["at_model_threshold"]
    assert record["model"] == site["parent"] and record["n_images"] == len(rows)
    assert record["intended_use"]["checked"] == len(rows) and record["intended_use"]["policy"].startswith("force")
    assert m["threshold"] == pytest.approx(json.loads(out.splitlines()[0])["threshold"])
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-4)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert record["calibration"]["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-5)
    assert all(lo <= m[k] <= hi for k, (lo, hi) in m["ci95"].items())
    site_threshold = record["at_site_threshold"]["threshold"]
    assert (p[y == 1] >= site_threshold - 1e-6).mean() >= 0.9

    tables = record["subgroups"]
    assert {"t_score", "site", "sex", "age", "bits"} <= set(tables)
    for name, table in tables.items():
        assert sum(r["n"] for r in table["rows"]) == len(rows), name
        assert sum(r["osteoporosis"] for r in table["rows"]) == int(y.sum()), name
    assert {r["value"]: r["n"] for r in tables["sex"]["rows"]} == Counter(r["sex"] for r in rows)
    assert [r["value"] for r in tables["site"]["rows"]] == ["B"]
    for name in ("evaluation.md", "evaluation_reliability.png", "evaluation_roc.png"):
        assert (root / "eval" / name).stat().st_size > 500
    site["evaluation"] = record


def _same_forest(a, b) -> bool:
    """Tree by tree, every node field and leaf value: an independent check of the recorded hash."""
    fa, fb = a.calibrated_classifiers_[0].estimator, b.calibrated_classifiers_[0].estimator
    fb = getattr(fb, "estimator", fb)  # the recalibrated version holds it in a FrozenEstimator
    if len(fa.estimators_) != len(fb.estimators_):
        return False
    for ta, tb in zip(fa.estimators_, fb.estimators_):
        sa, sb = ta.tree_.__getstate__(), tb.tree_.__getstate__()
        if not np.array_equal(sa["values"], sb["values"]):
            return False
        if any(not np.array_equal(sa["nodes"][f], sb["nodes"][f]) for f in sa["nodes"].dtype.names):
            return False
    return True


@pytest.mark.server
def test_recalibration_fixes_held_out_calibration_and_the_new_version_serves(site):
    from loadtest.server import ServerProcess
    from osteoscreen.client import ScreeningClient

    root, env, parent = site["root"], site["env"], site["parent"]
    tag = _run(["recalibrate", "--data", str(root / "data"), "--model", parent, "--reports", str(root / "recal")],
               env).stdout.strip().splitlines()[-1]
    assert tag.startswith("osteoscreen:") and tag != parent
    rec = json.loads((root / "recal" / "recalibration.json").read_text())
    before, after = rec["before"]["calibration"], rec["after"]["calibration"]
    assert after["ece"] < before["ece"] and after["brier"] < before["brier"]
    assert abs(after["intercept"]) < abs(before["intercept"])
    assert rec["intended_use"]["checked"] == len(site["rows"])  # the intended-use checks ran, as in evaluate
    assert rec["n_fit"] + rec["n_holdout"] == len(site["rows"]) - rec["intended_use"]["outside"]
    assert "| held-out site data | before (parent) | after (recalibrated) |" in (root / "recal" / "recalibration.md").read_text()

    # the parent's parts, byte for byte, and the lineage on record
    assert filecmp.cmp(_store(site, parent) / "extractor.keras", _store(site, tag) / "extractor.keras", shallow=False)
    assert filecmp.cmp(_store(site, parent) / "content_check.joblib", _store(site, tag) / "content_check.joblib",
                       shallow=False)  # the intended-use check comes along: it reads the same extractor
    assert _same_forest(joblib.load(_store(site, parent) / "classifier.joblib"),
                        joblib.load(_store(site, tag) / "classifier.joblib"))
    card = json.loads((_store(site, tag) / "model_card.json").read_text())
    assert card["parent"] == parent and card["recalibration"]["parent"] == parent
    assert card["threshold"] == rec["threshold"] and card["recalibration"]["data_fingerprint"] == rec["data_fingerprint"]

    # nothing new is needed to use it: evaluate checks its lineage, the server serves it
    _run(["evaluate", "--data", str(root / "data"), "--model", tag, "--reports", str(root / "eval2"), "--force"], env)
    again = json.loads((root / "eval2" / "evaluation.json").read_text())
    assert again["parent"] == parent and again["lineage"]["matches_parent"] is True
    assert again["data_fingerprint"] == rec["data_fingerprint"]
    srv = ServerProcess(env={**env, "OSTEOSCREEN_MODEL_TAG": tag}, log_path=root / "server.log").start()
    try:
        srv.wait_ready()
        with ScreeningClient(srv.grpc_target) as client:
            answer = client.predict(root / "data" / site["rows"][0]["path"], request_id="site-1")
    finally:
        srv.stop()
    assert f"{answer.model}:{answer.version}" == tag
    assert answer.threshold == pytest.approx(rec["threshold"])

"""Site validation without a network: calibration measures against known answers, subgroup tables (from
the manifest and from DICOM headers) whose counts add up, a recalibration that leaves the forest alone and
repairs a shifted population, the phantom's site knob, and bad folders refused with a clear error."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from scipy import ndimage
from scipy.special import expit
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier

from osteoscreen import cli
from training import phantom
from training.dataset import Sample
from training.site import calibration, cohort, lineage, recalibrate, subgroups


def _outcomes(n: int, seed: int, scale: float = 1.0, shift: float = 0.0):
    """True risk expit(lp); the model says expit(scale * lp + shift)."""
    rng = np.random.default_rng(seed)
    lp = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < expit(lp)).astype(int)
    return y, expit(scale * lp + shift)


def test_calibration_slope_and_intercept_recover_known_miscalibration():
    y, p = _outcomes(20000, 0)
    assert calibration.slope(y, p) == pytest.approx(1.0, abs=0.05)
    assert calibration.intercept(y, p) == pytest.approx(0.0, abs=0.05)
    y, p = _outcomes(20000, 1, scale=2.0)  # too extreme: slope 1/2
    assert calibration.slope(y, p) == pytest.approx(0.5, abs=0.03)
    y, p = _outcomes(20000, 2, shift=-1.0)  # predictions too low by one logit: intercept +1
    assert calibration.intercept(y, p) == pytest.approx(1.0, abs=0.06)


def test_ece_and_reliability_bins_by_hand():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 1])
    p = np.array([0.05, 0.15, 0.15, 0.55, 0.55, 0.95, 0.95, 0.95])
    bins = calibration.reliability(y, p)
    assert [(b["lo"], b["n"]) for b in bins] == [(0.0, 1), (0.1, 2), (0.5, 2), (0.9, 3)]
    assert sum(b["n"] for b in bins) == len(y)
    by_hand = (1 * 0.05 + 2 * abs(0.5 - 0.15) + 2 * abs(1.0 - 0.55) + 3 * abs(2 / 3 - 0.95)) / 8
    assert calibration.ece(y, p) == pytest.approx(by_hand)
    summary = calibration.summary(y, p)
    assert summary["observed_rate"] == pytest.approx(5 / 8) and summary["brier"] == pytest.approx(np.mean((p - y) ** 2))


def test_isotonic_zeros_and_ones_give_finite_calibration():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.0, 0.0, 1.0, 1.0, 0.3, 0.7])
    s = calibration.summary(y, p)
    assert np.isfinite(s["slope"]) and np.isfinite(s["intercept"])


def _write_manifest(root: Path, rows: list[dict]) -> list[Sample]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return [Sample(root / r["path"], int(r["label"] == "osteoporosis"), r["patient_id"]) for r in rows]


def test_subgroup_tables_count_every_image_once(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"path": f"x/{i}.png", "label": ("normal", "osteoporosis")[i % 3 == 0], "patient_id": f"p{i // 2}",
             "sex": "" if i == 7 else "FM"[i % 2], "age": str(45 + (i * 7) % 45), "t_score": f"{rng.normal(-2, 1):.2f}",
             "accession": f"A{i:05d}"} for i in range(60)]
    samples = _write_manifest(tmp_path, rows)
    attrs = {a.name: a for a in subgroups.manifest_attributes(tmp_path, samples)}
    assert set(attrs) == {"sex", "age", "t_score"}  # the accession number identifies images: no groups
    assert {v for v in attrs["age"].values} <= {"40-49", "50-59", "60-69", "70-79", "80-89"}
    assert attrs["sex"].values[7] == subgroups.UNKNOWN
    assert len(set(attrs["t_score"].values)) == 4  # many distinct numbers: quartiles
    y = np.array([s.label for s in samples])
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, len(y)), 0, 1)
    patients = np.array([s.patient_id for s in samples])
    for attribute in attrs.values():
        table = subgroups.table(attribute, y, p, 0.5, patients)
        assert sum(r["n"] for r in table) == len(samples)
        assert sum(r["osteoporosis"] for r in table) == int(y.sum())
        for r in table:
            m = np.array(attribute.values) == r["value"]
            positives = m & (y == 1)
            if positives.any():
                assert r["sensitivity"] == pytest.approx((p[positives] >= 0.5).mean())
                if len(set(patients[positives].tolist())) < 2:
                    assert r["sensitivity_ci95"] is None  # one patient: no spread to show
                    continue
                lo, hi = r["sensitivity_ci95"]
                assert lo <= r["sensitivity"] <= hi


def test_subgroup_intervals_redraw_patients_not_images():
    """Five views of each patient are no more evidence than one: the patient bootstrap gives the same interval,
    where an interval over images would narrow by about sqrt(5). A lone patient gets none."""
    rng = np.random.default_rng(3)
    hits = rng.random(12) < 0.7
    patients = np.array([f"p{i}" for i in range(12)])
    once = subgroups.patient_interval(hits, patients)
    assert once[0] < hits.mean() < once[1] and once[1] - once[0] > 0.2  # 12 patients: a wide interval
    assert subgroups.patient_interval(np.repeat(hits, 5), np.repeat(patients, 5)) == once
    assert subgroups.patient_interval(np.array([True, False, True]), np.array(["p1"] * 3)) is None


def _dicom(path: Path, manufacturer: str, model: str, sex: str, age: str | None, birth: str | None = None) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName, ds.PatientSex = "DX", manufacturer, model, sex
    if age:
        ds.PatientAge = age
    if birth:
        ds.PatientBirthDate, ds.StudyDate = birth, "20250601"
    pixels = (np.random.default_rng(len(str(path))).random((64, 64)) * 4000).astype(np.uint16)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 64, 64, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_header_groups_scanner_sex_and_age(tmp_path):
    _dicom(tmp_path / "a.dcm", "Acme", "X1", "F", "067Y")
    _dicom(tmp_path / "b.dcm", "Acme", "X1", "M", None, birth="19500101")  # age from the dates: 75
    _dicom(tmp_path / "c.dcm", "Other", "Z9", "", "030M")  # 2.5 years, sex not given
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "d.png")
    samples = [Sample(tmp_path / n, 0, n) for n in ("a.dcm", "b.dcm", "c.dcm", "d.png")]
    attrs = {a.name: a.values for a in subgroups.dicom_attributes(samples)}
    assert attrs["scanner"] == ["Acme X1", "Acme X1", "Other Z9", "not DICOM"]
    assert attrs["sex"] == ["F", "M", subgroups.UNKNOWN, "not DICOM"]
    assert attrs["age band"] == ["60-69", "70-79", "0-9", "not DICOM"]
    assert subgroups.dicom_attributes(samples[3:]) == []  # no DICOM, no DICOM tables


def _features(n: int, seed: int, shift: float, prevalence: float):
    """Features whose class signal is the same everywhere; `shift` moves a site's population and scanner."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    X = rng.normal(0.0, 1.0, (n, 6)) + 0.9 * y[:, None] + shift
    return X, y


def test_recalibration_keeps_the_forest_and_repairs_a_shifted_site():
    X, y = _features(400, 0, 0.0, 0.35)
    parent = CalibratedClassifierCV(RandomForestClassifier(n_estimators=50, random_state=0, min_samples_leaf=3),
                                    method="sigmoid", cv=3, ensemble=False).fit(X, y)
    before_hash = lineage.forest_sha256(parent)
    X_site, y_site = _features(600, 1, 0.6, 0.6)
    fit, held = slice(0, 300), slice(300, 600)
    child = recalibrate.recalibrated(parent, X_site[fit], y_site[fit])
    assert lineage.forest_of(child) is lineage.forest_of(parent)  # frozen: not refitted, not copied
    assert lineage.forest_sha256(child) == before_hash == lineage.forest_sha256(parent)
    p_before = parent.predict_proba(X_site[held])[:, 1]
    p_after = child.predict_proba(X_site[held])[:, 1]
    assert calibration.ece(y_site[held], p_after) < 0.8 * calibration.ece(y_site[held], p_before)
    assert abs(calibration.intercept(y_site[held], p_after)) < abs(calibration.intercept(y_site[held], p_before))


def test_a_forest_ensemble_cannot_be_recalibrated_silently():
    X, y = _features(120, 2, 0.0, 0.5)
    ensemble = CalibratedClassifierCV(RandomForestClassifier(n_estimators=5, random_state=0), cv=3).fit(X, y)
    with pytest.raises(lineage.LineageError, match="ensemble"):
        lineage.forest_of(ensemble)


def test_phantom_site_knobs():
    a, b = phantom.SITES["A"], phantom.SITES["B"]
    assert a is phantom.DEFAULT_CONFIG  # site A is the demo set, unchanged
    prevalence = {name: np.mean([phantom._patient(0, i, cfg).t_score <= phantom.THRESHOLD for i in range(1, 401)])
                  for name, cfg in (("A", a), ("B", b))}
    assert prevalence["A"] < 0.45 < prevalence["B"]

    def fine_detail(cfg) -> float:
        """High-pass spread inside the collimated field (the central half: the margins' sharp edges would
        swamp the noise being measured)."""
        img = phantom.render_sample(-2.0, seed=4, config=cfg).image.astype(np.float64)
        h, w = img.shape
        return float(np.std((img - ndimage.gaussian_filter(img, 2.0))[h // 4: 3 * h // 4, w // 4: 3 * w // 4]))

    base = fine_detail(a)
    # less dose, more quantum noise (measured inside the field: 0.0096, 0.0100, 0.0110, 0.0152 for exposure
    # 1, 0.5, 0.2, 0.05; the trabecular texture, not the noise, dominates the high-pass at full dose)
    by_dose = [fine_detail(replace(a, exposure=e)) for e in (0.5, 0.2, 0.05)]
    assert base < by_dose[0] < by_dose[1] < by_dose[2] and by_dose[2] > 1.3 * base, (base, by_dose)
    assert fine_detail(replace(a, blur=3.0)) < 0.8 * base
    assert phantom.render_sample(-2.0, seed=4, config=replace(a, site="Z")).image.tobytes() == \
        phantom.render_sample(-2.0, seed=4, config=a).image.tobytes()


def test_synth_writes_a_site_and_refuses_an_unknown_one(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path / "b"), "--n", "3", "--seed", "1", "--site", "B"]) == 0
    with open(tmp_path / "b" / "manifest.csv", newline="") as fh:
        assert {r["site"] for r in csv.DictReader(fh)} == {"B"}
    assert cli.main(["synth", "--out", str(tmp_path / "z"), "--n", "3", "--site", "Z"]) == 2
    assert "unknown site 'Z'" in capsys.readouterr().err


def _png_folder(root: Path, normal: int, osteoporosis: int) -> Path:
    for label, n in (("normal", normal), ("osteoporosis", osteoporosis)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            ramp = np.add.outer(np.arange(64), np.arange(64)) * (1 + i % 3)
            Image.fromarray((ramp % 256).astype(np.uint8)).save(root / label / f"{i}.png")
    return root


@pytest.mark.slow
def test_recalibrate_leaves_out_images_outside_the_intended_use(registered_model, tmp_path):
    """As `evaluate` and serving do: a chest film is left out by its header, synthetic ramps unlike any
    radiograph by the content check, and the record says which; the calibrator is fitted on the rest only."""
    import json
    import shutil
    import subprocess
    import sys

    from training.phantom import generate_dataset

    # phantom films like the ones the model was trained on (another seed), one synthetic ramp per class (far
    # outside: refused by the content check), and a chest film (refused by its header)
    folder = tmp_path / "site"
    generate_dataset(folder, 16, seed=11)
    (folder / "manifest.csv").unlink()  # a site's folder of films: every file in it is checked (a manifest picks files)
    for label in ("normal", "osteoporosis"):
        ramp = np.add.outer(np.arange(64), np.arange(64)) * 3
        Image.fromarray((ramp % 256).astype(np.uint8)).save(folder / label / "ramp.png")
    _dicom(folder / "normal" / "chest.dcm", "Acme", "X1", "F", "067Y")
    chest = pydicom.dcmread(folder / "normal" / "chest.dcm")
    chest.BodyPartExamined = "CHEST"
    chest.save_as(folder / "normal" / "chest.dcm")
    store = tmp_path / "bentoml"  # a copy: the new version must not become `latest` for the other tests
    shutil.copytree(registered_model["root"] / "bentoml", store)
    env = {**registered_model["env"], "BENTOML_HOME": str(store)}
    result = subprocess.run([str(Path(sys.executable).parent / "osteoscreen"), "recalibrate", "--data", str(folder),
                             "--model", registered_model["tag"], "--reports", str(tmp_path / "r")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "r" / "recalibration.json").read_text())["intended_use"]
    assert record["checked"] == 19 and record["by_check"].get("body_part") == 1
    assert record["by_check"].get("content") >= 2 and record["outside"] >= 3
    [chest_entry] = [f for f in record["files"] if f["path"] == str(folder / "normal" / "chest.dcm")]
    assert chest_entry["checks"][0] == "body_part"
    refused = {f["path"] for f in record["files"] if f["checks"] and f["checks"][0] == "content"}
    assert {str(folder / label / "ramp.png") for label in ("normal", "osteoporosis")} <= refused
    assert f"{record['outside']} of 19 images are outside the model's intended use" in result.stderr
    n = json.loads((tmp_path / "r" / "recalibration.json").read_text())
    assert n["n_fit"] + n["n_holdout"] == 19 - record["outside"]


@pytest.mark.parametrize("command", ["evaluate", "recalibrate"])
def test_bad_folders_get_a_clear_error(tmp_path, capsys, command):
    """Refused before any model is loaded: BENTOML_HOME is not even set up here."""
    extra = ["--model", "osteoscreen:none"] if command == "recalibrate" else []

    def run(folder: Path) -> str:
        assert cli.main([command, "--data", str(folder), "--reports", str(tmp_path / "r"), *extra]) == 2
        return capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert "is empty" in run(tmp_path / "empty")
    assert "0 'osteoporosis' images" in run(_png_folder(tmp_path / "one-class", 8, 0))
    bad = _png_folder(tmp_path / "unreadable", 6, 6)
    (bad / "osteoporosis" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    err = run(bad)
    assert "1 of 13 file(s) could not be read" in err and "broken.png" in err and "--skip-unreadable" in err
    assert not (tmp_path / "r").exists()


def test_skip_unreadable_lists_what_it_left_out(tmp_path):
    bad = _png_folder(tmp_path / "d", 6, 6)
    (bad / "normal" / "broken.png").write_bytes(b"not an image")
    loaded = cohort.load(bad, skip_unreadable=True)
    assert len(loaded.samples) == 12 and len(loaded.skipped) == 1 and "broken.png" in loaded.skipped[0]


def test_a_version_whose_parts_were_swapped_is_refused(tmp_path, monkeypatch):
    """verify() recomputes both hashes from what is stored and compares them with the record."""
    from osteoscreen.model import bundle

    X, y = _features(200, 3, 0.0, 0.4)
    forest = RandomForestClassifier(n_estimators=10, random_state=0)
    parent = CalibratedClassifierCV(forest, method="sigmoid", cv=3, ensemble=False).fit(X, y)
    child = recalibrate.recalibrated(parent, X[:100], y[:100])
    extractor = tmp_path / "extractor.keras"
    extractor.write_bytes(b"the parent's extractor")
    monkeypatch.setattr(bundle, "stored_file", lambda tag, part: extractor)
    monkeypatch.setattr(bundle, "find_model", lambda tag=None: None)  # parent no longer in the store
    record = {"parent": "osteoscreen:parent", "extractor_sha256": lineage.sha256_file(extractor),
              "forest_sha256": lineage.forest_sha256(parent)}

    def version(classifier) -> bundle.ModelBundle:
        return bundle.ModelBundle(None, classifier, [], 0.5, "vgg16", version="child",
                                  metadata={"recalibration": record})

    assert lineage.verify(version(child))["forest_sha256"] == record["forest_sha256"]
    other = CalibratedClassifierCV(RandomForestClassifier(n_estimators=10, random_state=1), cv=3, ensemble=False).fit(X, y)
    with pytest.raises(lineage.LineageError, match="forest sha256"):
        lineage.verify(version(other))
    extractor.write_bytes(b"another extractor")
    with pytest.raises(lineage.LineageError, match="extractor sha256"):
        lineage.verify(version(child))
    assert lineage.verify(bundle.ModelBundle(None, parent, [], 0.5, "vgg16")) is None  # a trained model: nothing to check


class _ScoredModel:
    """A model stand-in with the card's intended-use rules and a content check that scores image i as i."""

    def __init__(self, with_content_check: bool = True) -> None:
        from osteoscreen.intended_use.rules import IntendedUse

        self.intended_use = IntendedUse(content_cutoff=2.5)
        self.content_check = type("Scores", (), {"scores": staticmethod(lambda X: X[:, 0])})() if with_content_check else None


def test_evaluation_counts_what_the_intended_use_leaves_out(tmp_path):
    """Header checks with the model's own rules (a CHEST DICOM, a 30-month-old) and the content cut-off,
    as serving applies them; without a content check every image fails it, as in serving."""
    from training.site import intended

    folder = _png_folder(tmp_path / "d", 5, 5)
    _dicom(folder / "normal" / "chest.dcm", "Acme", "X1", "F", "067Y")
    chest = pydicom.dcmread(folder / "normal" / "chest.dcm")
    chest.BodyPartExamined = "CHEST"
    chest.save_as(folder / "normal" / "chest.dcm")
    _dicom(folder / "osteoporosis" / "child.dcm", "Acme", "X1", "F", "030M")
    loaded = cohort.load(folder)
    names = [s.path.name for s in loaded.samples]
    features = np.array([[3.0 if n == "1.png" else 1.0] for n in names], np.float32)  # one image unlike the rest

    found = intended.findings(_ScoredModel(), loaded, features)
    checks = {(s.path.parent.name, s.path.name): [f.check for f in f_] for s, f_ in zip(loaded.samples, found)}
    assert checks[("normal", "chest.dcm")] == ["body_part"]
    assert checks[("osteoporosis", "child.dcm")] == ["patient_age"]
    assert sorted(k for k, c in checks.items() if c == ["content"]) == [("normal", "1.png"), ("osteoporosis", "1.png")]
    summary = intended.summary(loaded, found, force=False)
    assert summary["checked"] == 12 and summary["outside"] == 4
    assert summary["by_check"] == {"body_part": 1, "patient_age": 1, "content": 2}

    kept, kept_features, record = intended.in_use(_ScoredModel(), loaded, features, force=False)
    assert len(kept.samples) == len(kept_features) == 8 and record["outside"] == 4
    assert {s.path.name for s in kept.samples}.isdisjoint({"chest.dcm", "child.dcm"})
    assert len(intended.in_use(_ScoredModel(), loaded, features, force=True)[0].samples) == 12

    blind = intended.findings(_ScoredModel(with_content_check=False), loaded, features)
    assert all(any(f.check == "content" for f in found) for found in blind)

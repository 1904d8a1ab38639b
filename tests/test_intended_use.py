"""Intended use without a model: DICOM header checks on pydicom-data's real films, the policy, the content
check's statistics, and what the inference path and every protocol do with images that fail a check.
(The learned check on real features and a real server: tests/test_intended_use_e2e.py.)"""

from __future__ import annotations

import asyncio
import json
import pickle

import grpc
import numpy as np
import pytest
from pydicom.dataset import Dataset
from starlette.testclient import TestClient

from osteoscreen.errors import OutOfIntendedUseError
from osteoscreen.intended_use.content import ContentCheck, choose_cutoff
from osteoscreen.intended_use.header import check_dataset, header_findings, patient_age_years
from osteoscreen.intended_use.policy import ENV, Policy, content_finding, enforce
from osteoscreen.intended_use.rules import IntendedUse
from osteoscreen.serving import http
from osteoscreen.serving.inference import InferencePath, ModelInfo
from osteoscreen.types import Finding
from tests.inputs import good_png, real_radiograph, retagged
from tests.inputs import testdata as dicom_file

RULES = IntendedUse(content_cutoff=5.0)


def checks(findings: list[Finding]) -> dict[str, str]:
    return {f.check: f.value for f in findings}


def lumbar_lateral(**tags: str) -> bytes:
    """RG3 (a real CR) retagged as what the model is for: a lateral lumbar spine of a 70-year-old."""
    return retagged("RG3_J2KR", **{"BodyPartExamined": "LSPINE", "ViewPosition": "LL", "PatientAge": "070Y", **tags})


# --- header checks ------------------------------------------------------------------------------------------

def test_pydicom_data_films_fail_the_header_checks_with_their_values():
    assert checks(header_findings(real_radiograph("RG1_UNCR"), None, RULES)) == {"body_part": "CHEST", "view": "PA"}
    # the tibia: born 1979, imaged 2004 -> 25.4 years, outside the declared 50-110
    assert checks(header_findings(real_radiograph("RG3_J2KR"), None, RULES)) == \
        {"body_part": "EXTREMITY", "view": "AP", "patient_age": "under 50"}
    assert checks(header_findings(dicom_file("MR2_UNCR.dcm"), None, RULES)) == {"modality": "MR"}
    assert checks(header_findings(dicom_file("US1_UNCR.dcm"), None, RULES)) == {"modality": "US"}


def test_a_lateral_lumbar_spine_passes_and_missing_tags_are_not_refusals():
    assert header_findings(lumbar_lateral(), None, RULES) == []
    assert header_findings(lumbar_lateral(BodyPartExamined="L-Spine", ViewPosition="RL"), None, RULES) == []
    bare = lumbar_lateral(BodyPartExamined=None, ViewPosition=None, PatientAge=None, PatientBirthDate=None)
    assert header_findings(bare, None, RULES) == []
    assert header_findings(good_png(0), None, RULES) == []  # PNG/JPEG: no header; the content check decides
    assert header_findings(b"not an image", "dicom", RULES) == []  # the decoder reports this one


def test_a_contradicting_tag_is_a_finding_each():
    assert checks(header_findings(lumbar_lateral(ViewPosition="AP"), None, RULES)) == {"view": "AP"}
    assert checks(header_findings(lumbar_lateral(Modality="CT"), None, RULES)) == {"modality": "CT"}
    assert checks(header_findings(lumbar_lateral(PatientAge="012Y"), None, RULES)) == {"patient_age": "under 50"}
    [child] = header_findings(lumbar_lateral(PatientAge="012Y"), None, RULES)
    assert "12" not in child.reason and "under 50 years" in child.reason  # an age band, never the age itself
    narrow = IntendedUse(age_years=(60.0, 65.0), age_source="ages of the 40 training patients")
    [finding] = header_findings(lumbar_lateral(), None, narrow)
    assert finding.check == "patient_age" and "60-65" in finding.reason and "training patients" in finding.reason


def test_patient_age_from_the_age_tag_or_the_dates():
    ds = Dataset()
    assert patient_age_years(ds) is None
    ds.PatientAge = "018M"
    assert patient_age_years(ds) == 1.5
    ds.PatientAge = "000Y"  # de-identified: absent, not a newborn
    assert patient_age_years(ds) is None
    ds.PatientBirthDate, ds.StudyDate = "19500601", "20200601"
    assert patient_age_years(ds) == 70.0
    ds.StudyDate = "garbage"
    assert patient_age_years(ds) is None


def test_view_code_sequence_counts_when_view_position_is_empty():
    ds = Dataset()
    ds.Modality = "DX"
    item = Dataset()
    item.CodeMeaning = "antero-posterior"
    ds.ViewCodeSequence = [item]
    assert checks(check_dataset(ds, RULES)) == {"view": "antero-posterior"}
    item.CodeMeaning = "lateral"
    assert check_dataset(ds, RULES) == []


def test_site_subgroups_read_ages_with_the_same_parser(tmp_path):
    """One DICOM age parser: "000Y" (what de-identification writes for "removed") is no age 0 in the subgroup
    tables either, and a real age lands in its decade band."""
    from training.site.subgroups import _header

    for age, band in (("000Y", "unknown"), ("070Y", "70-79")):
        path = tmp_path / f"{age}.dcm"
        path.write_bytes(lumbar_lateral(PatientAge=age, PatientBirthDate=""))
        assert _header(path)["age_band"] == band


# --- policy -------------------------------------------------------------------------------------------------

def test_policy_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert Policy.from_env() is Policy.REFUSE  # the default
    monkeypatch.setenv(ENV, " Flag ")
    assert Policy.from_env() is Policy.FLAG
    monkeypatch.setenv(ENV, "ignore")
    with pytest.raises(ValueError, match="OSTEOSCREEN_INTENDED_USE='ignore' is not valid: it accepts refuse or flag"):
        Policy.from_env()


def test_refuse_names_the_image_the_check_and_the_value():
    findings = [[], [Finding("body_part", "CHEST", "body part examined CHEST is not the lumbar spine")]]
    with pytest.raises(OutOfIntendedUseError, match=r"image 1: .*body_part check: body part examined CHEST") as error:
        enforce(findings, Policy.REFUSE)
    assert error.value.findings[0].value == "CHEST"
    enforce(findings, Policy.FLAG)  # flag never raises


def test_content_finding_and_a_model_without_a_content_check():
    assert content_finding(1.2, 5.0) is None
    assert content_finding(7.0, 5.0).check == "content" and "7 > cut-off 5" in content_finding(7.0, 5.0).reason
    assert content_finding(float("nan"), 5.0).value == "unavailable"
    assert content_finding(1.0, None).value == "unavailable"  # never silently skipped


# --- the content check's statistics -------------------------------------------------------------------------

def test_content_check_accepts_its_distribution_and_refuses_a_shifted_one():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 64)) / 8  # correlated features, like pooled activations

    def draw(n: int, shift: float = 0.0) -> np.ndarray:
        return rng.normal(size=(n, 64)) @ mixing + 3.0 + shift

    check = ContentCheck.fit(draw(400), draw(40), acceptance=0.99)
    accepted = float(np.mean(check.scores(draw(2000)) <= check.cutoff))
    assert accepted >= 0.97
    assert np.all(check.scores(draw(50, shift=1.0)) > check.cutoff)
    assert check.card()["content_acceptance"] == 0.99 and check.card()["content_n_calibration"] == 40
    again = pickle.loads(pickle.dumps(check))  # the bundle stores it with joblib
    probe = draw(5, 0.5)
    np.testing.assert_allclose(again.scores(probe), check.scores(probe))


def test_cutoff_extrapolates_past_a_small_validation_set_and_agrees_with_a_large_one():
    rng = np.random.default_rng(1)
    small = rng.lognormal(0.5, 0.3, size=10)
    assert choose_cutoff(small, 0.99) > small.max()  # a new image exceeds the max of 10 one time in 11
    large = rng.lognormal(0.5, 0.3, size=20000)
    assert choose_cutoff(large, 0.99) == pytest.approx(np.exp(0.5 + 2.326 * 0.3), rel=0.03)
    with pytest.raises(ValueError, match="too few"):
        choose_cutoff(np.array([1.0, 2.0]), 0.99)


# --- the inference path and the protocols, over a fake model ---------------------------------------------------

class ScoredModel:
    """Answers like the model service: probability 0.7, batch seconds and size, and a content score that is the
    image's mean intensity / 10 (so a test picks in- or out-of-distribution with the picture it sends)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        n = len(images)
        scores = images.reshape(n, -1).mean(axis=1) / 10
        return np.stack([np.full(n, 0.7), np.full(n, 0.01), np.full(n, n), scores], axis=1)


def path_with(policy: Policy, cutoff: float = 100.0) -> tuple[InferencePath, ScoredModel]:
    model = ScoredModel()
    path = InferencePath(model, policy=policy)
    path.set_model(ModelInfo("fake", "1", "vgg16", 0.5, IntendedUse(content_cutoff=cutoff).to_dict()))
    return path, model


def test_refuse_stops_a_chest_film_before_the_model_and_counts_it():
    from prometheus_client import REGISTRY

    def refused(check: str) -> float:
        return REGISTRY.get_sample_value("osteoscreen_out_of_intended_use_total",
                                         {"check": check, "action": "refused"}) or 0.0

    path, model = path_with(Policy.REFUSE)
    before = refused("body_part")
    with pytest.raises(OutOfIntendedUseError, match="body_part check: body part examined CHEST"):
        asyncio.run(path.predict([real_radiograph("RG1_J2KR")]))
    assert model.calls == 0 and refused("body_part") == before + 1
    [ok] = asyncio.run(path.predict([good_png(0)]))
    assert ok.findings == () and ok.probability == pytest.approx(0.7)


def test_refuse_applies_the_content_cutoff_and_flag_answers_with_the_findings():
    path, _ = path_with(Policy.REFUSE, cutoff=1.0)  # any picture scores > 1 here
    with pytest.raises(OutOfIntendedUseError, match="image 0: .*content check: the image is unlike"):
        asyncio.run(path.predict([good_png(0), good_png(1)]))
    flagged_path, model = path_with(Policy.FLAG, cutoff=1.0)
    [flagged] = asyncio.run(flagged_path.predict([real_radiograph("RG1_J2KR")]))
    assert model.calls == 1 and flagged.probability == pytest.approx(0.7)
    assert [f.check for f in flagged.findings] == ["body_part", "view", "content"]


def test_an_answer_without_content_scores_fails_the_content_check():
    async def old_model(images: np.ndarray) -> np.ndarray:  # a model service from before intended use
        n = len(images)
        return np.stack([np.full(n, 0.2), np.full(n, 0.01), np.full(n, n)], axis=1)

    for card in (None, IntendedUse(content_cutoff=5.0).to_dict()):  # no cut-off, or no score to compare
        path = InferencePath(old_model, policy=Policy.REFUSE)
        path.set_model(ModelInfo("fake", "1", "vgg16", 0.5, card))
        with pytest.raises(OutOfIntendedUseError, match="no content check"):
            asyncio.run(path.predict([good_png(0)]))


def test_http_answers_422_under_refuse_and_the_findings_under_flag():
    path, _ = path_with(Policy.REFUSE)
    with TestClient(http.create_app(path)) as client:
        refused = client.post("/predict", files={"image": ("x.dcm", real_radiograph("RG1_J2KR"), "application/dicom")})
        assert refused.status_code == 422 and "body part examined CHEST" in refused.json()["error"]
        assert set(client.post("/predict", content=good_png(0)).json()) == {"probability", "label", "threshold", "model"}
    path, _ = path_with(Policy.FLAG)
    with TestClient(http.create_app(path)) as client:
        body = client.post("/predict", content=real_radiograph("RG1_J2KR")).json()
        assert body["label"] == "osteoporosis"
        assert [(f["check"], f["value"]) for f in body["out_of_intended_use"]] == [("body_part", "CHEST"), ("view", "PA")]


@pytest.mark.parametrize("policy", [Policy.REFUSE, Policy.FLAG])
def test_grpc_own_api_and_v2_under_each_policy(policy):
    from tests.test_grpc_api import Running, rpc_error, spb, spb_grpc, vpb, vpb_grpc

    path, _ = path_with(policy)
    running = Running(path)
    try:
        stub, v2 = spb_grpc.ScreeningStub(running.channel), vpb_grpc.GRPCInferenceServiceStub(running.channel)
        chest = real_radiograph("RG1_J2KR")
        request = vpb.ModelInferRequest(model_name="osteoporosis")
        request.inputs.add(name="image", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([good_png(0), chest])
        if policy is Policy.REFUSE:
            error = rpc_error(stub.Predict, spb.PredictRequest(image=chest), timeout=10)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "CHEST" in error.details()
            error = rpc_error(v2.ModelInfer, request, timeout=10)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "image 1: " in error.details()
            assert not stub.Predict(spb.PredictRequest(image=good_png(0)), timeout=10).outside_intended_use
            return
        answer = stub.Predict(spb.PredictRequest(image=chest, request_id="c"), timeout=10)
        assert answer.outside_intended_use and answer.request_id == "c"
        assert [(f.check, f.value) for f in answer.intended_use_findings] == [("body_part", "CHEST"), ("view", "PA")]
        response = v2.ModelInfer(request, timeout=10)
        assert [o.name for o in response.outputs] == ["probability", "label"]  # stock clients see no change
        flagged = json.loads(response.parameters["out_of_intended_use"].string_param)
        assert {(f["index"], f["check"]) for f in flagged} == {(1, "body_part"), (1, "view")}
    finally:
        running.close()


# --- training's batch path and the bundle -------------------------------------------------------------------

def test_training_leaves_out_dicoms_of_other_body_parts_unless_forced(tmp_path):
    from training.dataset import Sample, read_images

    chest, spine = tmp_path / "chest.dcm", tmp_path / "spine.png"
    chest.write_bytes(real_radiograph("RG1_J2KR"))
    spine.write_bytes(good_png(0))
    samples = [Sample(chest, 0, "p1"), Sample(spine, 1, "p2")]
    images, _, problems = read_images(samples)
    assert images[0] is None and images[1] is not None
    assert problems == [f"{chest}: outside the intended use: body part examined CHEST is not the lumbar spine the "
                        "model was trained on; view PA is not the lateral projection the model was trained on"]
    images, _, problems = read_images(samples, force=True)
    assert images[0] is not None and problems == []


def _round_trip_with_content_check() -> None:
    """Runs in a fresh process (BentoML reads BENTOML_HOME once per process)."""
    from osteoscreen.model import bundle
    from tests.test_bundle import _tiny_bundle

    original = _tiny_bundle()
    rng = np.random.default_rng(2)
    batch = rng.uniform(0, 255, (6, 224, 224, 1)).astype(np.float32)
    train, val = original.features_of(batch[:4]), original.features_of(batch[4:])
    original.content_check = ContentCheck.fit(np.concatenate([train, train + 1.0]), np.concatenate([val, val, val]))
    original.metadata["intended_use"] = {**IntendedUse().to_dict(), **original.content_check.card()}
    loaded = bundle.load(bundle.register(original))
    np.testing.assert_allclose(loaded.assess(batch)[1], original.assess(batch)[1], rtol=1e-6)
    assert loaded.intended_use.content_cutoff == original.content_check.cutoff
    assert bundle.find_model(loaded.tag).info.metadata["content_cutoff"] == original.content_check.cutoff
    original.content_check = None  # a model from before the checks: NaN scores, never a silent pass
    assert np.isnan(bundle.load(bundle.register(original)).assess(batch)[1]).all()
    print("ROUND TRIP OK")


def test_the_content_check_travels_with_the_registered_model(tmp_path):
    from tests.test_bundle import _in_fresh_process

    result = _in_fresh_process("import tests.test_intended_use as t; t._round_trip_with_content_check()",
                               tmp_path / "bentoml")
    assert result.returncode == 0 and "ROUND TRIP OK" in result.stdout, result.stderr[-3000:]

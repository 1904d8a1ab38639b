"""The content check's two bands (osteoscreen/intended_use/content.py, policy.py): edges chosen from validation
scores and doubtful examples and stored with the model; a borderline image answered with the caution "unusual
image: check the view and the exposure" on every protocol and in the SR; a far outlier refused; only refusals
counted as outside the intended use; a model from before the bands refusing as it did. (What the bands do with a
real trained model: tests/test_intended_use_e2e.py, and `python -m training.content_bands`.)"""

from __future__ import annotations

import asyncio
import json
import math
import pickle

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from osteoscreen.errors import OutOfIntendedUseError
from osteoscreen.imaging.decode import decode_image, to_model_input
from osteoscreen.intended_use.content import REFUSE_ACCEPTANCE, ContentCheck, choose_cutoff, choose_refusal
from osteoscreen.intended_use.policy import UNUSUAL, Policy, content_band
from osteoscreen.intended_use.rules import IntendedUse
from osteoscreen.results import assemble
from osteoscreen.serving import http
from osteoscreen.serving.inference import InferencePath, ModelInfo
from tests.inputs import png, to_u8
from tests.test_intended_use import ScoredModel

RNG_MIXING = np.random.default_rng(0).normal(size=(64, 64)) / 8  # correlated features, like pooled activations


def _draw(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    return rng.normal(size=(n, 64)) @ RNG_MIXING + 3.0 + shift


def test_edges_from_validation_scores_and_doubtful_examples():
    rng = np.random.default_rng(1)
    train, val, doubtful = _draw(rng, 400), _draw(rng, 40), _draw(rng, 60, shift=1.0)
    check = ContentCheck.fit(train, val, doubtful=doubtful)
    typical, odd = check.scores(val), check.scores(doubtful)
    bound = choose_cutoff(typical, REFUSE_ACCEPTANCE)
    assert check.flag_cutoff == pytest.approx(choose_cutoff(typical, 0.99))
    assert check.cutoff == pytest.approx(math.sqrt(bound * float(np.median(odd))), rel=1e-6)  # halfway, log scale
    assert check.flag_cutoff < bound < check.cutoff < float(np.median(odd))
    fresh = check.scores(_draw(rng, 5000))
    bands = [content_band(s, check.flag_cutoff, check.cutoff) for s in fresh]
    assert bands.count("outside") <= 0.005 * len(fresh)  # the target: at most 0.5% of good images refused
    assert 0 < bands.count("unusual") <= 0.05 * len(fresh)  # some are answered with the caution, few
    far = check.scores(_draw(rng, 50, shift=2.5))
    assert all(content_band(s, check.flag_cutoff, check.cutoff) == "outside" for s in far)
    card = IntendedUse.from_dict({**IntendedUse().to_dict(), **check.card()})
    assert (card.content_flag_cutoff, card.content_cutoff) == (check.flag_cutoff, check.cutoff)


def test_doubtful_examples_below_the_in_distribution_bound_cannot_pull_the_refusal_edge_down():
    typical = np.random.default_rng(2).lognormal(0.0, 0.4, size=40)
    bound = choose_cutoff(typical, REFUSE_ACCEPTANCE)
    assert choose_refusal(typical, np.full(10, bound / 2)) == bound
    assert choose_refusal(typical, None) == bound
    assert choose_refusal(typical, np.full(10, bound * 4)) == pytest.approx(bound * 2)


def test_a_check_and_a_card_from_before_the_two_bands_refuse_as_they_did():
    rng = np.random.default_rng(3)
    check = ContentCheck.fit(_draw(rng, 200), _draw(rng, 30))
    for name in ("flag_cutoff", "doubtful_median", "n_doubtful"):  # what a check pickled before the bands lacks
        del check.__dict__[name]
    old = pickle.loads(pickle.dumps(check))
    assert old.flag_cutoff is None and "content_flag_cutoff" not in old.card()
    rules = IntendedUse.from_dict({"content_cutoff": 5.0, "content_acceptance": 0.99})  # an old model card
    info = ModelInfo("old", "1", "vgg16", 0.5, rules.to_dict())
    assert rules.content_flag_cutoff is None
    assert assemble(0.3, 4.99, (), info, rules).cautions == ()  # just below: answered, no caution, as before
    assert [f.check for f in assemble(0.3, 5.01, (), info, rules).findings] == ["content"]  # above: refused


# --- the served path: the edges as the model card stores them -------------------------------------------------

def _picture(power: float) -> bytes:
    """A gradient whose model input has mean intensity about 255 / (power + 1): ScoredModel's content score is
    that mean / 10, so the power picks the band."""
    ramp = np.linspace(0.0, 1.0, 256)[None, :].repeat(256, axis=0) ** power
    return png(to_u8(ramp))


def _score(data: bytes) -> float:
    return float(to_model_input(decode_image(data)).mean() / 10)


TYPICAL, BORDERLINE, FAR = _picture(4.0), _picture(1.0), _picture(0.2)


def _stored_card() -> dict:
    """The intended use a model card stores (ContentCheck.card() keys), edges between the three pictures."""
    low, mid, high = _score(TYPICAL), _score(BORDERLINE), _score(FAR)
    assert low < mid < high
    return {**IntendedUse().to_dict(), "content_cutoff": (mid + high) / 2, "content_flag_cutoff": (low + mid) / 2,
            "content_acceptance": 0.99, "content_refuse_acceptance": REFUSE_ACCEPTANCE}


def _path(policy: Policy) -> InferencePath:
    path = InferencePath(ScoredModel(), policy=policy)
    path.set_model(ModelInfo("fake", "1", "vgg16", 0.5, json.loads(json.dumps(_stored_card()))))
    return path


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_borderline_answered_with_the_caution_far_refused_and_only_refusals_counted_outside():
    path = _path(Policy.REFUSE)
    before = {band: _count("osteoscreen_content_check_total", band=band) for band in ("typical", "unusual", "outside")}
    refused_before = _count("osteoscreen_out_of_intended_use_total", check="content", action="refused")
    typical, borderline = asyncio.run(path.predict([TYPICAL, BORDERLINE]))
    assert typical.cautions == () and typical.findings == ()
    assert borderline.findings == () and [c.check for c in borderline.cautions] == ["content"]
    assert borderline.cautions[0].reason.startswith(UNUSUAL)
    with pytest.raises(OutOfIntendedUseError, match="content check: the image is unlike"):
        asyncio.run(path.predict([FAR]))
    after = {band: _count("osteoscreen_content_check_total", band=band) for band in before}
    assert {band: after[band] - before[band] for band in before} == {"typical": 1, "unusual": 1, "outside": 1}
    assert _count("osteoscreen_out_of_intended_use_total", check="content", action="refused") == refused_before + 1
    [flagged] = asyncio.run(_path(Policy.FLAG).predict([FAR]))  # flag answers the far one, as a finding
    assert [f.check for f in flagged.findings] == ["content"] and flagged.cautions == ()


def test_http_answers_the_caution():
    with TestClient(http.create_app(_path(Policy.REFUSE))) as client:
        body = client.post("/predict", content=BORDERLINE).json()
        assert "out_of_intended_use" not in body and body["label"] == "osteoporosis"
        assert [c["check"] for c in body["cautions"]] == ["content"] and UNUSUAL in body["cautions"][0]["reason"]
        assert "cautions" not in client.post("/predict", content=TYPICAL).json()
        refused = client.post("/predict", content=FAR)
        assert refused.status_code == 422 and "content check" in refused.json()["error"]


def test_grpc_and_v2_answer_the_caution():
    from tests.test_grpc_api import Running, rpc_error, spb, spb_grpc, vpb, vpb_grpc

    running = Running(_path(Policy.REFUSE))
    try:
        stub, v2 = spb_grpc.ScreeningStub(running.channel), vpb_grpc.GRPCInferenceServiceStub(running.channel)
        answer = stub.Predict(spb.PredictRequest(image=BORDERLINE), timeout=10)
        assert not answer.outside_intended_use and [c.check for c in answer.cautions] == ["content"]
        assert UNUSUAL in answer.cautions[0].reason
        assert not stub.Predict(spb.PredictRequest(image=TYPICAL), timeout=10).cautions
        error = rpc_error(stub.Predict, spb.PredictRequest(image=FAR), timeout=10)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "content check" in error.details()
        request = vpb.ModelInferRequest(model_name="osteoporosis")
        request.inputs.add(name="image", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([TYPICAL, BORDERLINE])
        response = v2.ModelInfer(request, timeout=10)
        assert [o.name for o in response.outputs] == ["probability", "label"]  # stock clients see no change
        assert "out_of_intended_use" not in response.parameters
        cautions = json.loads(response.parameters["cautions"].string_param)
        assert [(c["index"], c["check"]) for c in cautions] == [(1, "content")]
    finally:
        running.close()


def test_the_sr_of_an_unusual_image_keeps_its_finding_and_says_look_again():
    from osteoscreen.dicom_results import sr
    from osteoscreen.dicom_results.reader import read
    from tests.inputs import retagged

    source = retagged("RG3_J2KR", BodyPartExamined="LSPINE", ViewPosition="LL", PatientAge="070Y")
    rules = IntendedUse.from_dict(_stored_card())
    info = ModelInfo("fake", "1", "vgg16", 0.5, rules.to_dict())
    score = (rules.content_flag_cutoff + rules.content_cutoff) / 2
    prediction = assemble(0.8, score, (), info, rules)
    assert prediction.cautions and not prediction.findings
    results = sr.to_results(source, prediction, sr.Algorithm.of(info))
    text = results.sr.decode("latin-1")
    assert "Unusual image: check the view and the exposure" in text and "NOT A SCREENING RESULT" not in text
    assert read(results.sr).osteoporosis_present is True  # the finding stands

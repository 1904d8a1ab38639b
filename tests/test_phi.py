"""Internal errors are logged for the developer (reference, exception types, code locations) and answered
with a reference only: no exception message, which may quote a DICOM header value, reaches a log or a client.
The end-to-end check with a DICOM full of identifiers is in tests/test_tls_server.py."""

from __future__ import annotations

import logging
import re

import pytest

from starlette.testclient import TestClient

from osteoscreen.security.redact import traceback_without_messages
from osteoscreen.serving import http

SECRET = "Zyxwvut^Phisentinel"


class ExplodingPredictor:
    model_name, model_version, backbone = "m", "1", "vgg16"

    def is_ready(self) -> bool:
        return True

    async def predict(self, images, format_hints=None, timeout=None, dicom=None):
        try:
            raise KeyError(f"PatientName={SECRET}")
        except KeyError as exc:
            raise ValueError(f"could not handle {SECRET}") from exc


def test_http_internal_error_answers_a_reference_and_logs_no_message(caplog):
    caplog.set_level(logging.ERROR)
    client = TestClient(http.create_app(ExplodingPredictor()), raise_server_exceptions=True)
    response = client.post("/predict", content=b"\x89PNG whatever", headers={"Content-Type": "image/png"})
    assert response.status_code == 500 and SECRET not in response.text
    ref = response.json()["error"].split("(ref ")[1].split(")")[0]
    logged = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    assert ref in logged and "builtins.ValueError" in logged and "builtins.KeyError" in logged
    assert SECRET not in logged


def test_traceback_without_messages_keeps_locations_and_chain():
    try:
        ExplodingPredictor().predict  # noqa: B018
        raise RuntimeError(SECRET)
    except RuntimeError as exc:
        text = traceback_without_messages(exc)
    assert SECRET not in text and "builtins.RuntimeError" in text
    assert "test_traceback_without_messages_keeps_locations_and_chain" in text


def test_explanation_dicom_results_keep_identifiers_in_the_dicom_files_only(caplog):
    """The explanation path with DICOM results (SR + overlay Secondary Capture), over HTTP, with a DICOM full of
    identifiers: they are in the DICOM parts of the answer and nowhere else (headers, errors, logs). The same
    against a real server, its log and metrics: tests/test_dicom_pacs.py."""
    from osteoscreen.intended_use.policy import Policy
    from tests.test_dicom_results import PATIENT_ID, PATIENT_NAME, FixedExplanation, explain_app, multipart_dicom, \
        source

    secrets = (PATIENT_ID, *PATIENT_NAME.split("^"))
    caplog.set_level(logging.DEBUG)
    client = explain_app(Policy.FLAG, FixedExplanation(0.7))
    answer = client.post("/explain", content=source("RG1_J2KR"), headers={"Accept": "application/dicom"})
    assert answer.status_code == 200
    parts = multipart_dicom(answer.headers["content-type"], answer.content)
    assert len(parts) == 2  # the SR and the overlay image
    assert all(secret.encode() in part for part in parts for secret in secrets)  # the PACS files them by these
    headers = str(dict(answer.headers))
    errors = [client.post("/explain", content=source("RG1_J2KR", StudyInstanceUID=None),
                          headers={"Accept": "application/dicom"}).text,
              explain_app(Policy.REFUSE, FixedExplanation(0.7)).post(
                  "/explain", content=source("RG1_J2KR"), headers={"Accept": "application/dicom"}).text]
    for secret in secrets:
        assert secret not in headers and secret not in caplog.text and not any(secret in e for e in errors)


class ExplodingExplainer:
    """`ExplainPath.explain`'s signature, failing as a bug would: a message that quotes patient data."""

    async def explain(self, data, hint=None, timeout=None, protocol="http", dicom=False):
        raise RuntimeError(f"could not explain {SECRET}")


def _reference(text: str) -> str:
    return text.split("(ref ")[1].split(")")[0]


def test_an_internal_error_on_every_api_answers_a_reference_and_logs_no_message(caplog):
    """HTTP /predict and /explain, gRPC Predict, PredictBatch, PredictStream, Explain and v2 ModelInfer: each
    answers 500 / INTERNAL with a reference that is in the log, and neither the answer nor the log holds what
    the exception said."""
    import grpc

    from osteoscreen._generated.inference import grpc_predict_v2_pb2 as vpb
    from osteoscreen._generated.inference import grpc_predict_v2_pb2_grpc as vpb_grpc
    from osteoscreen._generated.osteoscreen.v1 import screening_pb2 as spb
    from osteoscreen._generated.osteoscreen.v1 import screening_pb2_grpc as spb_grpc
    from osteoscreen.serving.grpc.server import GrpcServer, GrpcSettings
    from tests.test_grpc_api import Running

    caplog.set_level(logging.ERROR)
    answers: dict[str, str] = {}
    app = http.create_app(ExplodingPredictor())
    app.state.explainer = ExplodingExplainer()
    client = TestClient(app, raise_server_exceptions=True)
    for api in ("/predict", "/explain"):
        response = client.post(api, content=b"\x89PNG whatever", headers={"Content-Type": "image/png"})
        assert response.status_code == 500, (api, response.text)
        answers[f"HTTP {api}"] = response.json()["error"]

    class Exploding(Running):
        async def _make(self, settings: GrpcSettings) -> GrpcServer:
            return GrpcServer(self.predictor, settings, explainer=ExplodingExplainer())

    srv = Exploding(ExplodingPredictor())
    try:
        stub = spb_grpc.ScreeningStub(srv.channel)
        request = spb.PredictRequest(image=b"\x89PNG whatever")
        infer = vpb.ModelInferRequest(model_name="osteoporosis")
        infer.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"\x89PNG x")
        calls = {
            "Predict": lambda: stub.Predict(request, timeout=5),
            "PredictBatch": lambda: stub.PredictBatch(spb.PredictBatchRequest(requests=[request]), timeout=5),
            "PredictStream": lambda: list(stub.PredictStream(iter([request]), timeout=5)),
            "Explain": lambda: stub.Explain(request, timeout=5),
            "ModelInfer": lambda: vpb_grpc.GRPCInferenceServiceStub(srv.channel).ModelInfer(infer, timeout=5),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INTERNAL, (name, caught.value.details())
            answers[f"gRPC {name}"] = caught.value.details()
    finally:
        srv.close()
    logged = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    for api, message in answers.items():
        assert SECRET not in message, f"{api} answered the exception's message"
        assert _reference(message) in logged, f"{api}'s reference is not in the log"
    assert SECRET not in logged


# --- the refusal paths: age, modality, content ------------------------------------------------------------------

BORN, STUDIED, INSTITUTION = "19990417", "20240102", "Hospital^Phisentinel"
HEADER_VALUES = (SECRET, BORN, STUDIED, INSTITUTION, "24.7", "XC")  # XC: the modality the second film claims


def _refused_films() -> dict[str, tuple[bytes, str]]:
    """check -> (a lateral lumbar film failing only that check, with identifiers), what the refusal must name."""
    from tests.inputs import retagged

    def film(**tags: object) -> bytes:
        return retagged("RG3_J2KR", **{"BodyPartExamined": "LSPINE", "ViewPosition": "LL", "PatientAge": "070Y",
                                       "PatientName": SECRET, "PatientID": "PID-" + SECRET[:7],
                                       "InstitutionName": INSTITUTION, "StudyDate": STUDIED, **tags})

    return {"patient_age": (film(PatientAge=None, PatientBirthDate=BORN), "patient age under 50"),
            "modality": (film(Modality="XC"), "modality check"),
            "content": (film(), "content check")}


def test_every_refusal_on_every_api_names_the_check_and_no_header_value_reaches_a_log_or_a_metric(caplog):
    """HTTP /predict and /explain (with DICOM results: only those follow the policy), gRPC Predict, PredictBatch,
    PredictStream, Explain and v2 ModelInfer, each sent a film refused by age, by modality and by content: each
    answer names the check (the age as a band), and no identifier, date, exact age or header value is in any
    answer, log record (every logger, DEBUG) or label of any metric."""
    import grpc
    from prometheus_client import REGISTRY

    from osteoscreen._generated.inference import grpc_predict_v2_pb2 as vpb
    from osteoscreen._generated.inference import grpc_predict_v2_pb2_grpc as vpb_grpc
    from osteoscreen._generated.osteoscreen.v1 import screening_pb2 as spb
    from osteoscreen._generated.osteoscreen.v1 import screening_pb2_grpc as spb_grpc
    from osteoscreen.intended_use.policy import Policy
    from osteoscreen.intended_use.rules import IntendedUse
    from osteoscreen.serving.explanations import ExplainPath
    from osteoscreen.serving.grpc.server import GrpcServer, GrpcSettings
    from osteoscreen.serving.inference import InferencePath, ModelInfo
    from tests.test_dicom_results import FixedExplanation
    from tests.test_grpc_api import Running
    from tests.test_intended_use import ScoredModel

    caplog.set_level(logging.DEBUG)
    info = ModelInfo("osteoscreen", "1", "vgg16", 0.5, IntendedUse(content_cutoff=1.0).to_dict())  # any film > 1
    predictor = InferencePath(ScoredModel(), policy=Policy.REFUSE)
    predictor.set_model(info)
    explainer = ExplainPath(FixedExplanation(0.7, content_score=50.0), lambda: info, policy=Policy.REFUSE)
    app = http.create_app(predictor)
    app.state.explainer = explainer
    client = TestClient(app, raise_server_exceptions=True)

    class WithExplainer(Running):
        async def _make(self, settings: GrpcSettings) -> GrpcServer:
            return GrpcServer(self.predictor, settings, explainer=explainer)

    answers: list[tuple[str, str, str]] = []  # (api, check, answer)
    srv = WithExplainer(predictor)
    try:
        stub = spb_grpc.ScreeningStub(srv.channel)
        for check, (data, named) in _refused_films().items():
            for api, accept in (("/predict", "application/json"), ("/explain", "application/dicom")):
                response = client.post(api, content=data, headers={"Content-Type": "application/dicom",
                                                                   "Accept": accept})
                assert response.status_code == 422, (api, check, response.text)
                answers.append((f"HTTP {api}", named, response.text + str(dict(response.headers))))
            request = spb.PredictRequest(image=data, dicom_results=True)
            infer = vpb.ModelInferRequest(model_name="osteoporosis")
            infer.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(data)
            calls = {
                "Predict": lambda: stub.Predict(request, timeout=10),
                "PredictBatch": lambda: stub.PredictBatch(spb.PredictBatchRequest(requests=[request]), timeout=10),
                "PredictStream": lambda: list(stub.PredictStream(iter([request]), timeout=10)),
                "Explain": lambda: stub.Explain(request, timeout=10),
                "ModelInfer": lambda: vpb_grpc.GRPCInferenceServiceStub(srv.channel).ModelInfer(infer, timeout=10),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (name, check, caught.value.details())
                answers.append((f"gRPC {name}", named, caught.value.details()))
    finally:
        srv.close()
    assert len(answers) == 3 * 7
    for api, named, text in answers:
        assert named in text, (api, text)
        leaked = [value for value in HEADER_VALUES if _names(text, value) and not (value == "XC" and "modality" in named)]
        assert not leaked, (api, leaked, text)  # an answer may name the refused modality, nothing else
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_info or ''}" for r in caplog.records)
    labels = [value for metric in REGISTRY.collect() for sample in metric.samples for value in sample.labels.values()]
    for value in HEADER_VALUES:
        assert not _names(logged, value), value
        assert not any(_names(label, value) for label in labels), value


def _names(text: str, value: str) -> bool:
    """Whether `text` carries the header value as a token of its own: "XC" leaks in "modality XC", not in
    "DEADLINE_EXCEEDED" (a gRPC status label an earlier test in the same process may have left in the registry)."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])", text) is not None

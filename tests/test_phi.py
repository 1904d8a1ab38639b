"""Internal errors are logged for the developer (reference, exception types, code locations) and answered
with a reference only: no exception message, which may quote a DICOM header value, reaches a log or a client.
The end-to-end check with a DICOM full of identifiers is in tests/test_tls_server.py."""

from __future__ import annotations

import logging

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

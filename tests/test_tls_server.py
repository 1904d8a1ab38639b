"""The real server (`bentoml serve service:Screening`) with TLS and with mutual TLS + an allow-list: HTTPS through
BentoML's SSL settings, gRPC (own API and v2 via stock tritonclient), the plaintext health-only port, refusal
of plaintext, of missing and foreign client certificates and of unlisted identities, certificate rotation
with no restart, bad certificate files stopping start-up, and no patient identifiers anywhere in the server's
output or metrics. Certificates are made at test time with `cryptography` (loadtest/certs.py)."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from loadtest.certs import LocalPKI, client_context, issue, localhost_pki, make_ca
from loadtest.server import ServerProcess
from osteoscreen._generated.inference import grpc_predict_v2_pb2 as v2
from osteoscreen._generated.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from osteoscreen._generated.osteoscreen.v1 import screening_pb2 as pb
from osteoscreen._generated.osteoscreen.v1 import screening_pb2_grpc as pb_grpc
from osteoscreen.serving.grpc.v2 import encode_raw_bytes
from tests.inputs import dicom_bytes, dicom_dataset
from tests.waiting import wait_until

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.server
ALLOWED = "radiology-platform"
# distinctive patient identifiers: none may appear in the server's output, its metrics or any answer
PHI = {"PatientName": "Zyxwvut^Phisentinel", "PatientID": "PHI7731QX", "PatientBirthDate": "19230417",
       "AccessionNumber": "ACC98765Z", "StudyInstanceUID": "1.2.826.0.1.3680043.99.7731.4242",
       "SeriesInstanceUID": "1.2.826.0.1.3680043.99.7731.4243"}


def _spine_pixels(registered_model) -> np.ndarray:
    png = sorted((registered_model["root"] / "data").glob("*/*.png"))[0]
    return (np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 257)


def phi_dicoms(registered_model) -> dict[str, bytes]:
    """A good DICOM radiograph and bad ones, every one carrying the patient identifiers."""
    def with_phi(ds):
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        return ds

    pixels = _spine_pixels(registered_model)
    good = dicom_bytes(with_phi(dicom_dataset(pixels)))
    no_pixels = with_phi(dicom_dataset(pixels))
    del no_pixels.PixelData
    palette = with_phi(dicom_dataset(pixels[:, :, None].repeat(3, 2).astype(np.uint8), photometric="RGB"))
    palette.PhotometricInterpretation = "PALETTE COLOR"
    truncated = good[: len(good) - pixels.size]  # header and half the pixels
    return {"good": good, "no-pixels": dicom_bytes(no_pixels), "palette": dicom_bytes(palette),
            "truncated": truncated}


def _start(registered_model, tmp_path: Path, env: dict[str, str], client_ssl: ssl.SSLContext) -> ServerProcess:
    srv = ServerProcess(env={**registered_model["env"], **env}, log_path=tmp_path / "server.log",
                        client_ssl=client_ssl).start()
    try:
        return srv.wait_ready(600)
    except BaseException:
        srv.stop()
        raise


def _health(target: str, creds: grpc.ChannelCredentials | None = None) -> int:
    with (grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _served_certificate(port: int, context: ssl.SSLContext, alpn: str) -> bytes:
    context.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> LocalPKI:
    return localhost_pki(tmp_path_factory.mktemp("pki"), client_name=ALLOWED)


@pytest.mark.slow
def test_tls_server_refuses_plaintext_and_serves_clients_trusting_the_ca(registered_model, pki, tmp_path):
    srv = _start(registered_model, tmp_path, pki.server_env(mutual=False), client_context(pki.ca))
    try:
        image = sorted((registered_model["root"] / "data").glob("*/*.png"))[0].read_bytes()
        assert srv.url.startswith("https://")
        with pytest.raises(requests.ConnectionError):
            requests.post(srv.url.replace("https", "http") + "/predict", data=image, timeout=10)
        with pytest.raises(requests.exceptions.SSLError):  # the private CA is not trusted by default
            requests.post(f"{srv.url}/predict", data=image, timeout=10)
        answer = requests.post(f"{srv.url}/predict", files={"image": ("s.png", image, "image/png")},
                               verify=str(pki.ca), timeout=120)
        assert answer.status_code == 200 and answer.json()["label"] in ("normal", "osteoporosis")
        creds = grpc.ssl_channel_credentials(pki.ca.read_bytes())
        with grpc.insecure_channel(srv.grpc_target) as plain:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.ScreeningStub(plain).Predict(pb.PredictRequest(image=image), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.secure_channel(f"localhost:{srv.grpc_port}", creds) as channel:
            own = pb_grpc.ScreeningStub(channel).Predict(pb.PredictRequest(image=image, request_id="t"), timeout=120)
        assert own.request_id == "t" and own.probability == pytest.approx(answer.json()["probability"], abs=1e-5)
        client = triton.InferenceServerClient(f"localhost:{srv.grpc_port}", ssl=True, root_certificates=str(pki.ca))
        tensor = triton.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
        assert client.infer("osteoporosis", [tensor]).as_numpy("probability")[0] == pytest.approx(own.probability, abs=1e-5)
        client.close()
        # the plaintext health port answers what the TLS port's health says: readiness follows the model
        # service's answers to a periodic check, which a model busy tracing a new batch size can miss twice
        # on a loaded machine (NOT_SERVING for a few seconds), so wait for it rather than read it once
        health_port = int(srv.env["OSTEOSCREEN_GRPC_HEALTH_PORT"])
        deadline = time.monotonic() + 60
        while _health(f"127.0.0.1:{health_port}") != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "the plaintext health port never said SERVING"
            time.sleep(0.5)
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def mtls(registered_model, pki, tmp_path_factory):
    """A mutual-TLS server with an allow-list, serving certificate files that the rotation test replaces."""
    live = tmp_path_factory.mktemp("live-certs")
    shutil.copy(pki.server_cert, live / "tls.crt")
    shutil.copy(pki.server_key, live / "tls.key")
    env = {**pki.server_env(mutual=True, allowed=ALLOWED),
           "OSTEOSCREEN_TLS_CERT": str(live / "tls.crt"), "OSTEOSCREEN_TLS_KEY": str(live / "tls.key")}
    srv = _start(registered_model, tmp_path_factory.mktemp("mtls"), env,
                 client_context(pki.ca, pki.client_cert, pki.client_key))
    yield srv, live
    srv.stop()


def _session(pki: LocalPKI, cert: Path | None = None, key: Path | None = None) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, when set, silently replaces session.verify
    session.verify = str(pki.ca)
    if cert is not None:
        session.cert = (str(cert), str(key))
    return session


def test_mtls_handshake_and_allow_list_on_https_and_grpc(mtls, pki, registered_model, tmp_path):
    srv, _ = mtls
    image = sorted((registered_model["root"] / "data").glob("*/*.png"))[1].read_bytes()
    allowed = _session(pki, pki.client_cert, pki.client_key)
    assert allowed.post(f"{srv.url}/predict", data=image, headers={"Content-Type": "image/png"}, timeout=120).status_code == 200
    with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):  # no certificate: handshake refused
        _session(pki).post(f"{srv.url}/predict", data=image, timeout=10)
    stranger = make_ca("Another CA")
    s_cert, s_key = issue(stranger, ALLOWED, dns=(ALLOWED,), server=False).write(tmp_path, "stranger")
    with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):
        _session(pki, s_cert, s_key).post(f"{srv.url}/predict", data=image, timeout=10)
    o_cert, o_key = issue(pki.authority, "billing", dns=("billing",), server=False).write(tmp_path, "other")
    other = _session(pki, o_cert, o_key)
    refused = other.post(f"{srv.url}/predict", data=image, timeout=30)
    assert refused.status_code == 403 and "not allowed" in refused.json()["error"]
    assert other.get(f"{srv.url}/readyz", timeout=10).status_code == 200  # probes/metrics carry no patient data

    target = f"localhost:{srv.grpc_port}"
    request = pb.PredictRequest(image=image)
    ca = pki.ca.read_bytes()
    cases = {
        "allowed": (grpc.ssl_channel_credentials(ca, pki.client_key.read_bytes(), pki.client_cert.read_bytes()), None),
        "no certificate": (grpc.ssl_channel_credentials(ca), grpc.StatusCode.UNAVAILABLE),
        "other CA": (grpc.ssl_channel_credentials(ca, s_key.read_bytes(), s_cert.read_bytes()), grpc.StatusCode.UNAVAILABLE),
        "not allowed": (grpc.ssl_channel_credentials(ca, o_key.read_bytes(), o_cert.read_bytes()),
                        grpc.StatusCode.PERMISSION_DENIED),
    }
    for name, (creds, code) in cases.items():
        with grpc.secure_channel(target, creds) as channel:
            stub, v2_stub = pb_grpc.ScreeningStub(channel), v2_grpc.GRPCInferenceServiceStub(channel)
            if code is None:
                assert stub.Predict(request, timeout=120).label in ("normal", "osteoporosis"), name
                assert v2_stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready, name
                continue
            for call, message in ((stub.Predict, request), (v2_stub.ServerReady, v2.ServerReadyRequest())):
                with pytest.raises(grpc.RpcError) as info:
                    call(message, timeout=10)
                assert info.value.code() == code, name


def test_rotation_on_a_running_server(mtls, pki, registered_model):
    """New certificate files: new HTTPS and gRPC connections get the new certificate; the server keeps answering."""
    srv, live = mtls
    image = sorted((registered_model["root"] / "data").glob("*/*.png"))[2].read_bytes()
    context = lambda: client_context(pki.ca, pki.client_cert, pki.client_key)  # noqa: E731
    old = pki.server_cert.read_bytes()
    old_der = ssl.PEM_cert_to_DER_cert(old.decode())
    assert _served_certificate(srv.http_port, context(), "http/1.1") == old_der
    assert _served_certificate(srv.grpc_port, context(), "h2") == old_der
    session = _session(pki, pki.client_cert, pki.client_key)
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def keep_asking() -> None:  # one keep-alive HTTPS connection and one gRPC channel, through the swap
        creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes())
        with grpc.secure_channel(f"localhost:{srv.grpc_port}", creds) as channel:
            stub = pb_grpc.ScreeningStub(channel)
            while not stop.is_set():
                try:
                    r = session.post(f"{srv.url}/predict", data=image, timeout=60)
                    if r.status_code != 200:
                        failures.append(f"HTTP {r.status_code}")
                    stub.Predict(pb.PredictRequest(image=image), timeout=60)
                    answered[0] += 1
                except Exception as exc:  # noqa: BLE001 - any failure breaks "never stopped answering"
                    failures.append(repr(exc))

    thread = threading.Thread(target=keep_asking)
    thread.start()
    # the keep-alive connection and the channel are open and have answered before the swap
    wait_until(lambda: answered[0] > 0 or failures, 120, message=lambda: f"no answer before the swap: {failures}")
    renewed = issue(pki.authority, "osteoscreen-renewed", dns=("localhost",), ips=("127.0.0.1",))
    tmp = live / "new"
    tmp.mkdir()
    cert_tmp, key_tmp = renewed.write(tmp, "x")
    key_tmp.replace(live / "tls.key")  # kubelet flips both at once; a rename each is the closest here
    cert_tmp.replace(live / "tls.crt")
    new_der = renewed.cert.public_bytes(serialization.Encoding.DER)
    assert _served_certificate(srv.http_port, context(), "http/1.1") == new_der
    assert _served_certificate(srv.grpc_port, context(), "h2") == new_der
    before = answered[0]
    fresh = _session(pki, pki.client_cert, pki.client_key)
    assert fresh.post(f"{srv.url}/predict", data=image, timeout=120).status_code == 200
    # the connection and channel opened before the swap answer after it too
    wait_until(lambda: answered[0] > before or failures, 120, message=lambda: f"no answer after the swap: {failures}")
    stop.set()
    thread.join(120)
    assert not failures and answered[0] > before > 0


def test_no_patient_identifier_in_answers_logs_or_metrics(mtls, pki, registered_model):
    srv, _ = mtls
    session = _session(pki, pki.client_cert, pki.client_key)
    answers: list[str] = []
    files = phi_dicoms(registered_model)
    creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes())
    with grpc.secure_channel(f"localhost:{srv.grpc_port}", creds) as channel:
        stub, v2_stub = pb_grpc.ScreeningStub(channel), v2_grpc.GRPCInferenceServiceStub(channel)
        for name, data in files.items():
            ok = name == "good"
            for response in (session.post(f"{srv.url}/predict", files={"image": ("x.dcm", data, "application/dicom")}, timeout=120),
                             session.post(f"{srv.url}/predict", data=data, headers={"Content-Type": "application/dicom"}, timeout=120)):
                assert response.status_code == (200 if ok else 400), (name, response.text)
                answers.append(response.text)
            calls = [
                lambda: stub.Predict(pb.PredictRequest(image=data, format="dicom", request_id="r1"), timeout=120),
                lambda: stub.PredictBatch(pb.PredictBatchRequest(requests=[pb.PredictRequest(image=data)]), timeout=120),
                lambda: list(stub.PredictStream(iter([pb.PredictRequest(image=data, request_id="s1")]), timeout=120)),
            ]
            raw = v2.ModelInferRequest(model_name="osteoporosis")
            raw.inputs.add(name="image", datatype="BYTES", shape=[1])
            raw.raw_input_contents.append(encode_raw_bytes([data]))
            contents = v2.ModelInferRequest(model_name="osteoporosis")
            contents.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(data)
            calls += [lambda r=raw: v2_stub.ModelInfer(r, timeout=120), lambda r=contents: v2_stub.ModelInfer(r, timeout=120)]
            for call in calls:
                try:
                    answers.append(str(call()))
                    assert ok, name
                except grpc.RpcError as exc:
                    assert not ok and exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, exc)
                    answers.append(exc.details() or "")
    # the stream answer, at least, must echo the request id: the answers were collected for real
    assert any("s1" in a for a in answers) and len(answers) == 4 * (2 + 5)
    metrics = session.get(f"{srv.url}/metrics", timeout=30).text
    assert "osteoscreen_predictions_total" in metrics
    # a request after all the others, to a path nobody serves: once its access line is in the log, the lines
    # the workers wrote for every request before it are too
    marker = f"/log-flush-marker-{time.monotonic_ns()}"
    assert session.get(f"{srv.url}{marker}", timeout=30).status_code == 404

    def flushed() -> str:
        text = srv.log_tail(10_000_000)
        return text if marker in text else ""

    output = wait_until(flushed, 30, message="the marker request's access line never reached the server's output")
    assert "invalid_input" in metrics and len(output) > 0
    for keyword, value in PHI.items():
        for where, text in (("answers", "\n".join(answers)), ("metrics", metrics), ("server output", output)):
            assert value not in text, f"{keyword} appears in the {where}"


def test_bad_certificate_files_stop_start_up_with_a_message(registered_model, pki, tmp_path):
    expired = issue(pki.authority, "osteoscreen", dns=("localhost",),
                    not_before=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
                    not_after=dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc))
    cert, key = expired.write(tmp_path, "expired")
    for env, message in (({"OSTEOSCREEN_TLS_CERT": str(cert), "OSTEOSCREEN_TLS_KEY": str(key)}, "expired on 2021-01-01"),
                         ({"OSTEOSCREEN_TLS_CERT": str(pki.server_cert), "OSTEOSCREEN_TLS_KEY": str(pki.client_key)},
                          "does not belong to the certificate")):
        result = subprocess.run([str(BIN / "bentoml"), "serve", "service:Screening", "--port", "0"],
                                cwd=Path(__file__).resolve().parents[1], env={**registered_model["env"], **env},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and message in result.stdout + result.stderr, result.stderr[-2000:]


def test_locust_users_run_over_mutual_tls(mtls, pki, tmp_path):
    from tests.test_loadtest import run_locust, stats_rows, NAMES

    srv, _ = mtls
    out = tmp_path / "locust"
    result = run_locust(srv, out, ["HttpPredictUser", "GrpcPredictUser", "V2InferUser"], run_time="12s",
                        extra=("--server-ca", str(pki.ca), "--client-cert", str(pki.client_cert),
                               "--client-key", str(pki.client_key)))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = stats_rows(out)
    for protocol, key in NAMES.items():
        assert int(rows[key]["Request Count"]) >= 1 and int(rows[key]["Failure Count"]) == 0, (protocol, rows[key])

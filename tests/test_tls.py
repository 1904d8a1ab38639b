"""TLS, mutual TLS, the caller allow-list and certificate rotation on the gRPC front end, in process with a
fake predictor (fast), plus the settings checks that stop a server with bad certificate files.
Certificates are made here, at test time, with `cryptography` (loadtest/certs.py).
The real server over HTTPS and gRPC is tested in tests/test_tls_server.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from loadtest.certs import LocalPKI, issue, localhost_pki, make_ca
from osteoscreen.cli.predict import predict_files_remote
from osteoscreen.client import ScreeningClient
from osteoscreen.security.identity import AllowList, certificate_identities
from osteoscreen.security.tls import CertificateFiles, TLSConfigError, TLSSettings
from osteoscreen.serving.grpc.server import GrpcServer, GrpcSettings
from tests.test_grpc_api import IMAGES, FakePredictor, expected

pytestmark = pytest.mark.timeout(60)
ALLOWED = "radiology-platform"


class TlsRunning:
    """A GrpcServer with TLS settings on free localhost ports, on an event loop thread."""

    def __init__(self, tls: TLSSettings) -> None:
        self.predictor = FakePredictor()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        settings = GrpcSettings(port=0, host="127.0.0.1", tls=tls, health_port=0)
        self.server = self.call(self._make(settings))
        self.port = self.call(self.server.start())
        self.target = f"localhost:{self.port}"
        with grpc.insecure_channel(f"127.0.0.1:{self.server.health_port}") as health:
            end = time.monotonic() + 5
            while _health(health) != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < end
                time.sleep(0.05)

    async def _make(self, settings: GrpcSettings) -> GrpcServer:
        return GrpcServer(self.predictor, settings)

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.server.stop(grace=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status


def _settings(pki: LocalPKI, mutual: bool, allowed: str = "") -> TLSSettings:
    return TLSSettings.from_env(pki.server_env(mutual=mutual, allowed=allowed))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> LocalPKI:
    return localhost_pki(tmp_path_factory.mktemp("pki"), client_name=ALLOWED)


@pytest.fixture(scope="module")
def tls_server(pki) -> Iterator[TlsRunning]:
    running = TlsRunning(_settings(pki, mutual=False))
    yield running
    running.close()


@pytest.fixture(scope="module")
def mtls_server(pki) -> Iterator[TlsRunning]:
    running = TlsRunning(_settings(pki, mutual=True, allowed=f"{ALLOWED},spiffe://hospital.example/ns/pacs/*"))
    yield running
    running.close()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# --- TLS ------------------------------------------------------------------------------------------------------


def test_tls_refuses_plaintext_and_serves_clients_that_trust_the_ca(tls_server, pki):
    with grpc.insecure_channel(tls_server.target) as plain:
        assert _code(lambda: _health(plain)) == grpc.StatusCode.UNAVAILABLE
    with ScreeningClient(tls_server.target, tls=True) as system_roots:  # the test CA is not a system root
        assert _code(lambda: system_roots.predict(IMAGES[0], timeout=5)) == grpc.StatusCode.UNAVAILABLE
    with ScreeningClient(tls_server.target, root_certificates=pki.ca) as client:
        result = client.predict(IMAGES[0], request_id="tls-1")
    assert (result.label, result.request_id) == (expected(IMAGES[0]).label, "tls-1")


def test_stock_tritonclient_with_ssl_true(tls_server, pki):
    client = triton.InferenceServerClient(tls_server.target, ssl=True, root_certificates=str(pki.ca))
    assert client.is_server_ready()
    tensor = triton.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(IMAGES[:2], dtype=np.object_))
    result = client.infer("osteoporosis", [tensor])
    assert [v.decode() for v in result.as_numpy("label")] == [expected(i).label for i in IMAGES[:2]]
    client.close()
    plain = triton.InferenceServerClient(tls_server.target)
    with pytest.raises(InferenceServerException):
        plain.is_server_live(client_timeout=3)
    plain.close()


# --- mutual TLS and the allow-list ----------------------------------------------------------------------------


def test_mtls_needs_a_client_certificate_from_the_client_ca(mtls_server, pki, tmp_path):
    with ScreeningClient(mtls_server.target, root_certificates=pki.ca) as no_cert:
        assert _code(lambda: no_cert.predict(IMAGES[0], timeout=5)) == grpc.StatusCode.UNAVAILABLE
    stranger_ca = make_ca("Some other CA")
    cert, key = issue(stranger_ca, ALLOWED, dns=(ALLOWED,), server=False).write(tmp_path, "stranger")
    with ScreeningClient(mtls_server.target, root_certificates=pki.ca, client_cert=cert, client_key=key) as other:
        assert _code(lambda: other.predict(IMAGES[0], timeout=5)) == grpc.StatusCode.UNAVAILABLE
    with ScreeningClient(mtls_server.target, root_certificates=pki.ca, client_cert=pki.client_cert,
                         client_key=pki.client_key) as allowed:
        assert allowed.predict(IMAGES[1]).label == expected(IMAGES[1]).label


def test_allow_list_refuses_a_valid_but_unlisted_identity_on_every_api(mtls_server, pki, tmp_path):
    cert, key = issue(pki.authority, "billing-service", dns=("billing-service",), server=False).write(tmp_path, "b")
    creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(mtls_server.target, creds) as channel:
        with ScreeningClient(mtls_server.target, root_certificates=pki.ca, client_cert=cert, client_key=key) as c:
            assert _code(lambda: c.predict(IMAGES[0])) == grpc.StatusCode.PERMISSION_DENIED
            assert _code(lambda: c.predict_many(IMAGES[:2])) == grpc.StatusCode.PERMISSION_DENIED
        tri = triton.InferenceServerClient(mtls_server.target, ssl=True, root_certificates=str(pki.ca),
                                           private_key=str(key), certificate_chain=str(cert))
        with pytest.raises(InferenceServerException) as info:
            tri.get_model_metadata("osteoporosis")
        assert info.value.status() == "StatusCode.PERMISSION_DENIED"
        tri.close()
        # health carries no patient data and stays open to any certificate from the client CA
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    # a SPIFFE id matched by a prefix entry is allowed
    spiffe = "spiffe://hospital.example/ns/pacs/sa/gateway"
    cert, key = issue(pki.authority, "gateway", uris=(spiffe,), server=False).write(tmp_path, "spiffe")
    with ScreeningClient(mtls_server.target, root_certificates=pki.ca, client_cert=cert, client_key=key) as c:
        assert c.predict(IMAGES[2]).label == expected(IMAGES[2]).label


def test_predict_cli_path_takes_ca_cert_and_key(mtls_server, pki, tmp_path):
    import io

    image = tmp_path / "spine.png"
    image.write_bytes(IMAGES[3])
    out, err = io.StringIO(), io.StringIO()
    assert predict_files_remote([image], mtls_server.target, root_certificates=pki.ca, client_cert=pki.client_cert,
                                client_key=pki.client_key, out=out, err=err) == 0, err.getvalue()
    assert expected(IMAGES[3]).label in out.getvalue()
    assert predict_files_remote([image], mtls_server.target, root_certificates=pki.ca, timeout=3,
                                out=io.StringIO(), err=err) == 2
    assert "TLS handshake" in err.getvalue()
    import subprocess
    import sys

    cli = [str(Path(sys.executable).parent / "osteoscreen"), "predict", str(image), "--server", mtls_server.target,
           "--ca", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key)]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and expected(IMAGES[3]).label in done.stdout, done.stderr[-2000:]
    half = subprocess.run(cli[:-2], capture_output=True, text=True, timeout=60)
    assert half.returncode == 2 and "--cert and --key go together" in half.stderr


def test_health_port_is_plaintext_and_serves_health_only(mtls_server):
    with grpc.insecure_channel(f"127.0.0.1:{mtls_server.server.health_port}") as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = grpc_screening_stub(channel)
        assert _code(lambda: stub.Predict(predict_request(IMAGES[0]), timeout=3)) == grpc.StatusCode.UNIMPLEMENTED


def grpc_screening_stub(channel):
    from osteoscreen.serving.grpc import screening

    return screening.pb_grpc.ScreeningStub(channel)


def predict_request(image: bytes):
    from osteoscreen.serving.grpc import screening

    return screening.pb.PredictRequest(image=image)


# --- rotation ---------------------------------------------------------------------------------------------------


def served_certificate(port: int, pki: LocalPKI) -> bytes:
    """The DER certificate a new TLS connection to the port is given (Python's ssl, ALPN h2 like gRPC)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(pki.client_cert, pki.client_key)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def live_certificate_files(pki: LocalPKI, tmp_path) -> tuple:
    """A copy of the server certificate and key in a folder of their own, for a test to replace (a renewal)."""
    folder = tmp_path / "live"
    folder.mkdir()
    cert, key = folder / "tls.crt", folder / "tls.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    return cert, key


def test_rotation_new_connections_get_the_new_certificate_without_a_pause(pki, tmp_path):
    from cryptography.hazmat.primitives import serialization

    cert, key = live_certificate_files(pki, tmp_path)
    running = TlsRunning(TLSSettings(cert, key, pki.ca))
    try:
        first = served_certificate(running.port, pki)
        assert first == _der(pki.server_cert.read_bytes())
        errors: list[BaseException] = []
        answered = [0]
        stop = threading.Event()

        def keep_calling() -> None:  # one long-lived connection, answering all through the swap
            with ScreeningClient(running.target, root_certificates=pki.ca, client_cert=pki.client_cert,
                                 client_key=pki.client_key) as client:
                while not stop.is_set():
                    try:
                        client.predict(IMAGES[0], timeout=5)
                        answered[0] += 1
                    except grpc.RpcError as exc:
                        errors.append(exc)

        thread = threading.Thread(target=keep_calling)
        thread.start()
        time.sleep(0.3)
        renewed = issue(pki.authority, "osteoscreen", dns=("localhost",), ips=("127.0.0.1",))
        # a renewal written file by file: for a moment the key does not match the certificate
        cert.write_bytes(renewed.cert_pem)
        mid = served_certificate(running.port, pki)
        assert mid == first, "a half-written renewal must not replace the working certificate"
        key.write_bytes(renewed.key_pem)
        before = answered[0]
        second = served_certificate(running.port, pki)
        assert second == renewed.cert.public_bytes(serialization.Encoding.DER) != first
        with ScreeningClient(running.target, root_certificates=pki.ca, client_cert=pki.client_cert,
                             client_key=pki.client_key) as fresh:
            assert fresh.predict(IMAGES[1]).label == expected(IMAGES[1]).label
        time.sleep(0.3)
        stop.set()
        thread.join(10)
        assert not errors and answered[0] > before > 0
        assert running.server.certificates.reloads == 1
    finally:
        running.close()


def _der(pem: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_certificate_files_ignore_an_unusable_update_and_take_the_next(pki, tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    files = CertificateFiles(TLSSettings(cert, key))
    assert files.poll() is None
    cert.write_bytes(b"garbage")
    assert files.poll() is None and files.current.cert_pem == pki.server_cert.read_bytes()
    renewed = issue(pki.authority, "osteoscreen", dns=("localhost",))
    cert.write_bytes(renewed.cert_pem)
    key.write_bytes(renewed.key_pem)
    os.utime(cert, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
    assert files.poll().cert_pem == renewed.cert_pem and files.reloads == 1


# --- settings that must stop start-up -----------------------------------------------------------------------------


def test_bad_settings_stop_start_up_with_a_clear_message(pki, tmp_path):
    env = pki.server_env(mutual=True)
    assert TLSSettings.from_env({}) is None
    assert TLSSettings.from_env(env).mutual
    cases = {
        "does not exist": {**env, "OSTEOSCREEN_TLS_CERT": str(tmp_path / "missing.crt")},
        "does not belong to the certificate": {**env, "OSTEOSCREEN_TLS_KEY": str(pki.client_key)},
        "both OSTEOSCREEN_TLS_CERT and OSTEOSCREEN_TLS_KEY": {"OSTEOSCREEN_TLS_CERT": str(pki.server_cert)},
        "need TLS": {"OSTEOSCREEN_TLS_CLIENT_CA": str(pki.ca)},
        "only mutual TLS proves": {**pki.server_env(mutual=False), "OSTEOSCREEN_ALLOWED_CLIENTS": ALLOWED},
        "holds no PEM certificate": {**env, "OSTEOSCREEN_TLS_CLIENT_CA": str(pki.server_key)},
    }
    now = dt.datetime.now(dt.timezone.utc)
    for name, kwargs in {"expired on": dict(not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1)),
                         "not valid before": dict(not_before=now + dt.timedelta(days=1))}.items():
        c, k = issue(pki.authority, "osteoscreen", dns=("localhost",), **kwargs).write(tmp_path, name.replace(" ", "_"))
        cases[name] = {**env, "OSTEOSCREEN_TLS_CERT": str(c), "OSTEOSCREEN_TLS_KEY": str(k)}
    for message, case in cases.items():
        with pytest.raises(TLSConfigError, match=message):
            TLSSettings.from_env(case)


def test_identities_and_allow_list(pki):
    ca = make_ca()
    leaf = issue(ca, "cn-only").cert
    assert certificate_identities(leaf) == ("cn-only",)
    leaf = issue(ca, "pacs", dns=("pacs.hospital.example",), uris=("spiffe://h/ns/x/sa/y",), ips=("10.0.0.7",)).cert
    assert certificate_identities(leaf) == ("pacs.hospital.example", "spiffe://h/ns/x/sa/y", "10.0.0.7", "pacs")
    allow = AllowList.parse(" pacs.hospital.example , spiffe://h/ns/x/* ")
    assert allow.allows(["pacs.hospital.example"]) and allow.allows(["spiffe://h/ns/x/sa/z"])
    assert not allow.allows(["spiffe://h/ns/other/sa/y", "pacs"]) and not allow.allows([])


# --- HTTPS: uvicorn (as BentoML runs it) with the TLS protocol and the allow-list, in process ----------------


class HttpsRunning:
    """uvicorn with `https.ssl_config`'s settings, `https.install`'s protocol and the allow-list middleware,
    around a tiny app that answers with the identities it was called by."""

    def __init__(self, tls: TLSSettings) -> None:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        import uvicorn.config

        from osteoscreen.serving import https

        self._restore = (uvicorn.config.HTTP_PROTOCOLS["auto"], https._files)

        async def who(request):
            return JSONResponse({"identities": list(https.caller_identities(request.scope) or ())})

        app = https.CallerAllowList(Starlette(routes=[Route("/predict", who, methods=["POST"]),
                                                      Route("/readyz", who)]), allowed=tls.allowed)
        https.install(tls)
        cfg = https.ssl_config(tls)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, ssl_certfile=cfg["certfile"],
                                ssl_keyfile=cfg["keyfile"], ssl_ca_certs=cfg.get("ca_certs"),
                                ssl_cert_reqs=cfg.get("cert_reqs", ssl.CERT_NONE))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < end, "uvicorn did not start"
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"https://localhost:{self.port}"

    def close(self) -> None:
        import uvicorn.config

        from osteoscreen.serving import https

        self.server.should_exit = True
        self.thread.join(10)
        uvicorn.config.HTTP_PROTOCOLS["auto"], https._files = self._restore


def _https(url: str, pki: LocalPKI, cert=None, key=None, method: str = "POST"):
    import requests

    return requests.request(method, url, verify=str(pki.ca), cert=(str(cert), str(key)) if cert else None, timeout=10)


def test_https_mtls_allow_list_and_rotation_in_uvicorn(pki, tmp_path):
    import requests

    cert, key = live_certificate_files(pki, tmp_path)
    running = HttpsRunning(TLSSettings(cert, key, pki.ca, AllowList.parse(ALLOWED)))
    try:
        ok = _https(f"{running.url}/predict", pki, pki.client_cert, pki.client_key)
        assert ok.status_code == 200 and ALLOWED in ok.json()["identities"]
        with pytest.raises(requests.exceptions.ConnectionError):  # plaintext to the TLS port
            requests.post(f"http://localhost:{running.port}/predict", timeout=5)
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            _https(f"{running.url}/predict", pki)  # no client certificate: refused in the handshake
        stranger = issue(make_ca("Another CA"), ALLOWED, dns=(ALLOWED,), server=False).write(tmp_path, "s")
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            _https(f"{running.url}/predict", pki, *stranger)
        other = issue(pki.authority, "billing", dns=("billing",), server=False).write(tmp_path, "o")
        refused = _https(f"{running.url}/predict", pki, *other)
        assert refused.status_code == 403 and "not allowed" in refused.json()["error"]
        assert _https(f"{running.url}/readyz", pki, *other, method="GET").json()["identities"] == ["billing"]

        first = served_certificate(running.port, pki)
        renewed = issue(pki.authority, "osteoscreen-2", dns=("localhost",), ips=("127.0.0.1",))
        key.write_bytes(renewed.key_pem)
        cert.write_bytes(renewed.cert_pem)
        second = served_certificate(running.port, pki)
        assert second != first and second == _der(renewed.cert_pem)
        assert _https(f"{running.url}/predict", pki, pki.client_cert, pki.client_key).status_code == 200
    finally:
        running.close()


# --- the benchmark over mutual TLS ----------------------------------------------------------------------------------


def test_bench_clients_speak_mutual_tls(mtls_server, pki):
    from loadtest.clients import Clients
    from loadtest.images import Sample

    sample = Sample(name="x.png", data=IMAGES[4], format="png")

    async def both() -> list[str]:
        tls = (str(pki.ca), str(pki.client_cert), str(pki.client_key))
        async with Clients("https://unused.invalid", mtls_server.target, tls=tls) as clients:
            secure = [await clients.grpc(sample, 5), await clients.v2(sample, 5)]
        async with Clients("https://unused.invalid", mtls_server.target) as plain:
            return secure + [await plain.grpc(sample, 5)]

    assert asyncio.run(both()) == ["ok", "ok", "rejected"]  # plaintext never connects (UNAVAILABLE)


def test_bench_tls_target_compares_each_protocol_with_its_plaintext_row():
    from loadtest.bench import _tls_targets

    served = [{"protocol": "grpc", "concurrency": 32, "ratio_to_raw": 0.90},
              {"protocol": "grpc", "concurrency": 1, "ratio_to_raw": 0.50},
              {"protocol": "grpc", "concurrency": 32, "ratio_to_raw": 0.99, "note": "after C=32"},
              {"protocol": "grpc", "concurrency": 32, "ratio_to_raw": 0.87, "note": "mutual TLS", "tls": True},
              {"protocol": "http", "concurrency": 32, "ratio_to_raw": 0.80},
              {"protocol": "http", "concurrency": 32, "ratio_to_raw": 0.70, "note": "mutual TLS", "tls": True}]
    targets = {t["protocol"]: t for t in _tls_targets(served, 32)}
    assert targets["grpc"]["measured"] == pytest.approx(0.87 / 0.90, abs=1e-3) and targets["grpc"]["met"]
    assert targets["http"]["measured"] == pytest.approx(0.875, abs=1e-3) and not targets["http"]["met"]

"""Locust load test for OsteoScreen: HTTP `POST /predict`, gRPC `osteoscreen.v1.Screening/Predict` and the
Open Inference Protocol v2 (`inference.GRPCInferenceService/ModelInfer`), with an SLO gate.

    locust -f loadtest/locustfile.py --headless -u 6 -r 6 -t 60s --host http://127.0.0.1:3000 \
        --grpc-target 127.0.0.1:50051 --slo loadtest/slo.yaml --csv reports/loadtest/locust \
        --html reports/loadtest/report.html [HttpPredictUser GrpcPredictUser V2InferUser]

`make loadtest` (loadtest/run.py) starts a server and runs exactly this. Every call, of every protocol, is
reported to Locust's statistics (gRPC through `GrpcClient`, which fires Locust's request events), and a
call only counts as a success when the answer is a well-formed prediction.

Inputs (`--data DIR`, or env OSTEOSCREEN_LOADTEST_DATA): every PNG/JPEG/DICOM file under DIR; by default a
few phantom spine radiographs (8/16-bit PNG and JPEG copies) and the real DICOM radiographs of pydicom-data
(RG1/RG3, uncompressed and JPEG 2000), drawn with the weights of `--mix` (default png=6,jpeg=3,dicom=1).
HTTP requests alternate between a multipart upload and a raw body; v2 requests alternate between
`raw_input_contents` and `contents.bytes_contents`.

TLS: an `https://` host and `--server-ca CA.pem` (plus `--client-cert`/`--client-key` for mutual TLS) make every user
speak TLS: HTTP through geventhttpclient's SSL context, gRPC through a secure channel.

Load shape: `-u` users (closed loop, no think time) or, with `--rate-per-user R`, each user paced at R
requests/s (Locust's constant_throughput), for an open-ish offered load below capacity (soak runs).

At the end (`quitting`), the SLO file (`--slo`) is checked against the statistics of each protocol whose user
class ran; the verdict is printed, written as JSON (`--slo-report`, default `<csv prefix>_slo.json`), and sets
the exit code: 0 when every SLO holds (even if some requests failed within the allowed ratio), 1 otherwise.

This process never imports TensorFlow (only locust, grpc, the generated stubs and `loadtest.images`'
image mix), and imports locust first: gevent must patch the standard library before anything else loads.
"""

from __future__ import annotations

import locust  # noqa: F401 - first: imported after tensorflow or urllib3, gevent's ssl patching recurses, the process dies
from locust import FastHttpUser, User, constant_throughput, events, task
from locust.runners import WorkerRunner

import grpc  # noqa: E402
import grpc.experimental.gevent as grpc_gevent  # noqa: E402

grpc_gevent.init_gevent()  # after gevent's monkey patching (done by locust), before any channel exists

import ipaddress  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `loadtest` and `osteoscreen`

from loadtest import slo  # noqa: E402
from osteoscreen import codegen  # noqa: E402
from loadtest.images import DEFAULT_MIX, ImageMix, Sample, build_mix  # noqa: E402
from osteoscreen.serving.grpc.v2 import InvalidTensor, decode_raw_bytes, encode_raw_bytes  # noqa: E402 - grpc, numpy
from osteoscreen.types import LABELS  # noqa: E402

codegen.ensure_stubs()
from osteoscreen._generated.inference import grpc_predict_v2_pb2 as v2_pb  # noqa: E402
from osteoscreen._generated.inference import grpc_predict_v2_pb2_grpc as v2_grpc  # noqa: E402
from osteoscreen._generated.osteoscreen.v1 import screening_pb2 as pb  # noqa: E402
from osteoscreen._generated.osteoscreen.v1 import screening_pb2_grpc as pb_grpc  # noqa: E402

MiB = 1024 * 1024
# protocol -> (Locust request_type, name): the stats entries the SLO gate reads
ENTRIES = {
    "http": ("POST", "/predict"),
    "grpc": ("grpc", "osteoscreen.v1.Screening/Predict"),
    "v2": ("grpc", "inference.GRPCInferenceService/ModelInfer"),
}
DEFAULT_SLO = str(Path(__file__).with_name("slo.yaml"))

MIX: ImageMix | None = None
_pacing = None  # constant_throughput(rate) when --rate-per-user is set


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("OsteoScreen")
    group.add_argument("--grpc-target", default="", env_var="LOCUST_GRPC_TARGET",
                       help="HOST:PORT of the gRPC port (default: the --host's name, port $OSTEOSCREEN_GRPC_PORT or 50051)")
    group.add_argument("--data", default=os.environ.get("OSTEOSCREEN_LOADTEST_DATA", ""), env_var="LOCUST_DATA",
                       help="folder of PNG/JPEG/DICOM files to send (default: phantoms + pydicom-data radiographs)")
    group.add_argument("--mix", default=DEFAULT_MIX, env_var="LOCUST_MIX", help="format weights, e.g. png=6,jpeg=3,dicom=1")
    group.add_argument("--request-timeout", type=float, default=60.0, env_var="LOCUST_REQUEST_TIMEOUT",
                       help="per-request deadline, seconds (gRPC deadline; HTTP X-Request-Timeout and network timeout)")
    group.add_argument("--rate-per-user", type=float, default=0.0, env_var="LOCUST_RATE_PER_USER",
                       help="requests/s per user (0: no think time, a closed loop)")
    group.add_argument("--slo", default=DEFAULT_SLO, env_var="LOCUST_SLO", help="SLO file to gate on ('' for none)")
    group.add_argument("--slo-report", default="", env_var="LOCUST_SLO_REPORT",
                       help="where to write the SLO verdict as JSON (default: <--csv prefix>_slo.json)")
    # (Locust's own --tls-cert/--tls-key are for its web UI)
    group.add_argument("--server-ca", default="", env_var="LOCUST_SERVER_CA",
                       help="PEM CA to verify the server with: HTTPS and gRPC over TLS (an https:// --host)")
    group.add_argument("--client-cert", default="", env_var="LOCUST_CLIENT_CERT",
                       help="PEM client certificate (mutual TLS)")
    group.add_argument("--client-key", default="", env_var="LOCUST_CLIENT_KEY", help="PEM client key (mutual TLS)")
    group.add_argument("--allow-remote", action="store_true", default=False,
                       help="allow targets that are not loopback addresses (off: load tests stay on this machine)")


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except (OSError, ValueError):
        return False


def _grpc_target(environment) -> str:
    options = environment.parsed_options
    if options.grpc_target:
        return options.grpc_target
    host = urlsplit(environment.host or "http://127.0.0.1").hostname or "127.0.0.1"
    return f"{host}:{os.environ.get('OSTEOSCREEN_GRPC_PORT', '50051')}"


@events.init.add_listener
def _setup(environment, **_kwargs) -> None:
    global MIX, _pacing
    options = environment.parsed_options
    if options is None:  # a library use of this file (no command line): nothing to set up
        return
    if not options.allow_remote:
        targets = [urlsplit(environment.host or "").hostname or "", _grpc_target(environment).rsplit(":", 1)[0]]
        remote = [t for t in targets if t and not _is_loopback(t.strip("[]"))]
        if remote:
            raise SystemExit(f"refusing to load-test non-loopback targets {remote}; pass --allow-remote if you mean it")
    if options.slo:
        slo.load(options.slo)  # a broken SLO file fails now, not after the run
    MIX = build_mix(options.data or None, options.mix)  # in every process that runs users
    print(f"[osteoscreen] inputs: {MIX.describe()}", file=sys.stderr)
    if options.server_ca:  # verify the server (certificate and name) against the CA
        HttpPredictUser.ssl_context_factory = staticmethod(_ssl_context_factory(options))
        HttpPredictUser.insecure = False
    HttpPredictUser.network_timeout = options.request_timeout
    HttpPredictUser.connection_timeout = min(10.0, options.request_timeout)
    _pacing = constant_throughput(options.rate_per_user) if options.rate_per_user > 0 else None


def _ssl_context_factory(options):
    """geventhttpclient asks for an SSL context per connection pool (passing its own `cafile`, None here):
    the CA, and the client certificate if given."""
    import gevent.ssl

    def factory(cafile=None, **_ignored):
        context = gevent.ssl.create_default_context(cafile=options.server_ca)
        if options.client_cert:
            context.load_cert_chain(options.client_cert, options.client_key or None)
        return context
    return factory


def _grpc_credentials(options) -> grpc.ChannelCredentials | None:
    if not options.server_ca:
        return None
    read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(options.server_ca), read(options.client_key), read(options.client_cert))


def _wait(user: User) -> float:
    return _pacing(user) if _pacing else 0.0


def _check_prediction(probability: float, label: str) -> str | None:
    if label not in LABELS:
        return f"label {label!r} is not one of {LABELS}"
    if not 0.0 <= probability <= 1.0:
        return f"probability {probability} outside [0, 1]"
    return None


# -------------------------------------------------------------------------------------------------- HTTP


def _multipart(sample: Sample) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{Path(sample.name).name}\"\r\n"
            f"Content-Type: {sample.content_type}\r\n\r\n").encode()
    return head + sample.data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class HttpPredictUser(FastHttpUser):
    """`POST /predict`, half multipart (field `image`), half the raw file as the body."""

    wait_time = _wait
    network_timeout = 60.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.rng = random.Random()

    @task
    def predict(self) -> None:
        sample = MIX.pick(self.rng)
        if self.rng.random() < 0.5:
            body, content_type = _multipart(sample)
        else:
            body, content_type = sample.data, sample.content_type
        headers = {"Content-Type": content_type, "X-Request-Timeout": f"{self.network_timeout:g}"}
        with self.client.post("/predict", data=body, headers=headers,
                              name=ENTRIES["http"][1], catch_response=True) as response:
            if response.status_code != 200:
                text = (response.text or "")[:120] if response.status_code else str(response.error)[:120]
                response.failure(f"HTTP {response.status_code}: {text}")
                return
            try:
                answer = json.loads(response.text)
                problem = _check_prediction(float(answer["probability"]), answer["label"])
            except (ValueError, KeyError, TypeError) as exc:
                problem = f"malformed answer: {exc}"
            if problem:
                response.failure(problem)
            else:
                response.success()


# -------------------------------------------------------------------------------------------------- gRPC


class GrpcCallFailed(Exception):
    pass


class GrpcClient:
    """A blocking gRPC channel whose calls are reported to Locust: every call fires `events.request` with its
    time, response size and, when it failed (an RPC error or an answer that `check` rejects), the reason."""

    def __init__(self, target: str, environment, timeout: float,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.environment = environment
        self.timeout = timeout
        options = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
        self.channel = (grpc.secure_channel(target, credentials, options=options) if credentials
                        else grpc.insecure_channel(target, options=options))

    def call(self, name: str, method, request, check) -> object | None:
        started = time.perf_counter()
        response, exception = None, None
        try:
            response = method(request, timeout=self.timeout)
            problem = check(response)
            if problem:
                exception = GrpcCallFailed(problem)
        except grpc.RpcError as exc:
            code = exc.code()
            details = re.sub(r"\(ref [0-9a-f]+\)", "(ref ...)", exc.details() or "")  # one error group, not one per ref
            exception = GrpcCallFailed(f"{code.name if code else 'UNKNOWN'}: {details[:120]}")
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - started) * 1000.0,
            response_length=response.ByteSize() if response is not None else 0,
            exception=exception, context={})
        return response

    def close(self) -> None:
        self.channel.close()


class _GrpcUser(User):
    abstract = True
    wait_time = _wait
    stub_class: type  # the generated stub this user calls

    def on_start(self) -> None:
        self.rng = random.Random()
        options = self.environment.parsed_options
        self.client = GrpcClient(_grpc_target(self.environment), self.environment, options.request_timeout,
                                 _grpc_credentials(options))
        self.stub = self.stub_class(self.client.channel)

    def on_stop(self) -> None:
        self.client.close()


class GrpcPredictUser(_GrpcUser):
    """`osteoscreen.v1.Screening/Predict`, one image per call, with a request id that must come back."""

    stub_class = pb_grpc.ScreeningStub

    @task
    def predict(self) -> None:
        sample = MIX.pick(self.rng)
        request_id = uuid.uuid4().hex
        request = pb.PredictRequest(image=sample.data, format=sample.format if self.rng.random() < 0.5 else "",
                                    request_id=request_id)

        def check(r: pb.PredictResponse) -> str | None:
            if r.request_id != request_id:
                return f"request id {r.request_id!r} is not the one sent"
            return _check_prediction(r.probability, r.label)

        self.client.call(ENTRIES["grpc"][1], self.stub.Predict, request, check)


class V2InferUser(_GrpcUser):
    """Open Inference Protocol v2 `ModelInfer` on model `osteoporosis`, input `image` (BYTES [1]), half in
    `raw_input_contents` (what tritonclient sends), half in `contents.bytes_contents` (kserve's form)."""

    stub_class = v2_grpc.GRPCInferenceServiceStub

    @task
    def infer(self) -> None:
        sample = MIX.pick(self.rng)
        request = v2_pb.ModelInferRequest(model_name="osteoporosis", id=uuid.uuid4().hex)
        tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
        raw = self.rng.random() < 0.5
        if raw:
            request.raw_input_contents.append(encode_raw_bytes([sample.data]))
        else:
            tensor.contents.bytes_contents.append(sample.data)
        self.client.call(ENTRIES["v2"][1], self.stub.ModelInfer, request, lambda r: _check_v2(r, raw))


def _check_v2(response: v2_pb.ModelInferResponse, raw: bool) -> str | None:
    outputs = {o.name: (i, o) for i, o in enumerate(response.outputs)}
    if set(outputs) != {"probability", "label"}:
        return f"outputs {sorted(outputs)}, expected probability and label"
    if raw:
        if len(response.raw_output_contents) != 2:
            return "raw request answered without raw_output_contents"
        probability = struct.unpack("<f", response.raw_output_contents[outputs["probability"][0]][:4])[0]
        try:
            [label_bytes] = decode_raw_bytes(response.raw_output_contents[outputs["label"][0]], 1)
        except InvalidTensor as exc:
            return f"label output: {exc}"
        label = label_bytes.decode()
    else:
        probability = outputs["probability"][1].contents.fp32_contents[0]
        label = outputs["label"][1].contents.bytes_contents[0].decode()
    return _check_prediction(probability, label)


# -------------------------------------------------------------------------------------------------- SLO gate

USER_PROTOCOLS = {HttpPredictUser: "http", GrpcPredictUser: "grpc", V2InferUser: "v2"}


def observed_stats(stats) -> dict[str, dict]:
    observed = {}
    for protocol, (method, name) in ENTRIES.items():
        entry = stats.entries.get((name, method))
        if entry is None or entry.num_requests == 0:
            continue
        observed[protocol] = {
            "requests": entry.num_requests, "failures": entry.num_failures,
            "p50_ms": entry.get_response_time_percentile(0.50), "p95_ms": entry.get_response_time_percentile(0.95),
            "p99_ms": entry.get_response_time_percentile(0.99), "rps": round(entry.total_rps, 3),
        }
    return observed


@events.quitting.add_listener
def _slo_gate(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None or not options.slo or isinstance(environment.runner, WorkerRunner):
        return
    active = {USER_PROTOCOLS[c] for c in environment.user_classes if c in USER_PROTOCOLS}
    observed = observed_stats(environment.stats)
    total = {"requests": environment.stats.total.num_requests, "failures": environment.stats.total.num_failures}
    checks = slo.evaluate(slo.load(options.slo), observed, total, active)
    print(slo.report(checks, options.slo), file=sys.stderr)
    target = options.slo_report or (f"{options.csv_prefix}_slo.json" if options.csv_prefix else "")
    if target:
        slo.write_json(target, checks, observed, total, options.slo)
    environment.process_exit_code = 0 if slo.passed(checks) else 1

"""The gRPC front end end-to-end on localhost with a fake Predictor: our Screening API, the v2 protocol through
stock tritonclient, health, reflection, limits, deadlines, overload and graceful shutdown.

The server runs on its own event loop thread, as in a BentoML worker; the tests use blocking clients.
kserve's InferenceGRPCClient is not tested: every kserve release pins protobuf < 7 (0.17: >=6.33.5,<7) while
grpcio-health-checking 1.85 needs protobuf >= 7.35.1, so it cannot be installed beside this stack.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from osteoscreen import codegen
from osteoscreen.serving.grpc import screening as grpc_screening, v2 as grpc_v2
from osteoscreen.cli.predict import predict_files_remote
from osteoscreen.client import ScreeningClient
from osteoscreen.errors import ImageDecodeError, OverloadedError
from osteoscreen.serving.grpc.server import GrpcServer, GrpcSettings
from osteoscreen.types import Prediction

spb, spb_grpc = grpc_screening.pb, grpc_screening.pb_grpc
vpb, vpb_grpc = grpc_v2.pb, grpc_v2.pb_grpc
pytestmark = pytest.mark.timeout(60)
THRESHOLD = 0.5


def expected(image: bytes) -> Prediction:
    probability = hashlib.sha256(image).digest()[0] / 255
    label = "osteoporosis" if probability >= THRESHOLD else "normal"
    return Prediction(probability=probability, label=label, threshold=THRESHOLD, model="osteo-fake", version="v1")


class FakePredictor:
    """Deterministic stand-in for the model: probability from the bytes' hash; b"BAD..." is undecodable."""

    model_name, model_version, backbone = "osteo-fake", "v1", "vgg16"

    def __init__(self) -> None:
        self.delay = 0.0
        self.overloaded = False
        self.ready = True
        self.crash = False
        self.batches: list[int] = []

    def is_ready(self) -> bool:
        return self.ready

    async def predict(self, images, format_hints=None, timeout=None, dicom=None) -> list[Prediction]:
        """The signature of `osteoscreen.types.Predictor.predict`; `dicom` (DICOM results wanted) is not used."""
        self.batches.append(len(images))
        if self.overloaded:
            raise OverloadedError("queue full (fake)")
        if self.crash:
            raise RuntimeError("secret internal detail")
        for i, image in enumerate(images):
            if image.startswith(b"BAD"):
                raise ImageDecodeError(f"image {i}: not a PNG, JPEG or DICOM file")
        if self.delay:
            if timeout is not None and timeout < self.delay:
                await asyncio.sleep(timeout)
                raise TimeoutError
            await asyncio.sleep(self.delay)
        return [expected(image) for image in images]


class Running:
    """A GrpcServer on a free localhost port, served by an event loop on a background thread."""

    def __init__(self, predictor: FakePredictor | None = None, **settings: object) -> None:
        self.predictor = predictor or FakePredictor()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._make(GrpcSettings(**{"port": 0, "host": "127.0.0.1", **settings})))
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)
        wait_for_health(self.channel, health_pb2.HealthCheckResponse.SERVING)

    async def _make(self, settings: GrpcSettings) -> GrpcServer:
        return GrpcServer(self.predictor, settings)

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.channel.close()
        self.call(self.server.stop(grace=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def health_status(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def wait_for_health(channel: grpc.Channel, status: int, timeout: float = 5) -> None:
    end = time.monotonic() + timeout
    while health_status(channel) != status:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        assert time.monotonic() < end, f"health never became {name}"
        time.sleep(0.05)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


@pytest.fixture(scope="module")
def srv() -> Iterator[Running]:
    running = Running()
    yield running
    running.close()


@pytest.fixture()
def fake(srv: Running) -> Iterator[FakePredictor]:
    yield srv.predictor
    srv.predictor.delay, srv.predictor.overloaded, srv.predictor.ready, srv.predictor.crash = 0.0, False, True, False


IMAGES = [b"\x89PNG fake image %d" % i for i in range(5)]


# --- our own API -------------------------------------------------------------------------------------------

def test_screening_unary_batch_and_stream_echo_request_ids(srv: Running, fake: FakePredictor) -> None:
    with ScreeningClient(srv.target) as client:
        one = client.predict(IMAGES[0], request_id="r-0", format="png")
        many = client.predict_many(IMAGES, request_ids=[f"b-{i}" for i in range(5)], batch_size=2)
    want = expected(IMAGES[0])
    assert (one.label, one.model, one.version, one.request_id) == (want.label, "osteo-fake", "v1", "r-0")
    assert one.probability == pytest.approx(want.probability, abs=1e-6) and one.threshold == pytest.approx(THRESHOLD)
    assert [m.request_id for m in many] == [f"b-{i}" for i in range(5)]
    assert [m.probability for m in many] == pytest.approx([expected(i).probability for i in IMAGES], abs=1e-6)
    assert fake.batches[-3:] == [2, 2, 1]  # a PredictBatch reaches the predictor as one batch

    stub = spb_grpc.ScreeningStub(srv.channel)
    requests = (spb.PredictRequest(image=img, request_id=f"s-{i}") for i, img in enumerate(IMAGES))
    answers = {r.request_id: r for r in stub.PredictStream(requests, timeout=10)}
    assert sorted(answers) == [f"s-{i}" for i in range(5)]
    assert all(answers[f"s-{i}"].probability == pytest.approx(expected(img).probability, abs=1e-6)
               for i, img in enumerate(IMAGES))
    n = 3 * grpc_screening.STREAM_WINDOW  # more than one window: reading pauses and resumes
    many = (spb.PredictRequest(image=b"%d" % i, request_id=str(i)) for i in range(n))
    assert sorted(int(r.request_id) for r in stub.PredictStream(many, timeout=10)) == list(range(n))


def test_screening_bad_input_is_invalid_argument_with_reason(srv: Running, fake: FakePredictor) -> None:
    stub = spb_grpc.ScreeningStub(srv.channel)
    cases = [
        (stub.Predict, spb.PredictRequest(image=b"BAD bytes"), "not a PNG, JPEG or DICOM"),
        (stub.Predict, spb.PredictRequest(image=b""), "empty image"),
        (stub.Predict, spb.PredictRequest(image=IMAGES[0], format="gif"), "unknown format hint 'gif'"),
        (stub.PredictBatch, spb.PredictBatchRequest(requests=[spb.PredictRequest(image=IMAGES[0]),
                                                              spb.PredictRequest(image=b"BAD")]), "image 1"),
    ]
    for method, request, reason in cases:
        error = rpc_error(method, request, timeout=5)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in error.details(), error.details()
    stream = [spb.PredictRequest(image=IMAGES[0], request_id="ok"), spb.PredictRequest(image=b"BAD", request_id="x-7")]
    error = rpc_error(lambda: list(stub.PredictStream(iter(stream), timeout=5)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-7" in error.details()


def test_unexpected_error_is_internal_without_details(srv: Running, fake: FakePredictor, caplog) -> None:
    fake.crash = True
    error = rpc_error(spb_grpc.ScreeningStub(srv.channel).Predict, spb.PredictRequest(image=IMAGES[0]), timeout=5)
    assert error.code() == grpc.StatusCode.INTERNAL and "secret" not in error.details()
    ref = error.details().split("(ref ")[1].split(")")[0]
    # the log finds the bug (type, location) but never quotes the message: it may hold patient data
    logged = [r.getMessage() for r in caplog.records if ref in r.getMessage()]
    assert logged and "builtins.RuntimeError" in logged[0] and "in predict" in logged[0]
    assert not any("secret internal detail" in (r.getMessage() + str(r.exc_info)) for r in caplog.records)


# --- the v2 protocol, through the stock tritonclient -----------------------------------------------------------

def test_v2_metadata_and_readiness_with_tritonclient(srv: Running, fake: FakePredictor) -> None:
    client = triton.InferenceServerClient(srv.target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("osteoporosis") and client.is_model_ready("osteoporosis", "v1")
    meta = client.get_server_metadata()
    assert meta.name == "osteoscreen" and meta.version
    model = client.get_model_metadata("osteoporosis")
    assert model.versions == ["v1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("image", "BYTES", [-1])]
    assert [(t.name, t.datatype) for t in model.outputs] == [("probability", "FP32"), ("label", "BYTES")]
    for call, args in [(client.get_model_metadata, ("resnet",)), (client.is_model_ready, ("osteoporosis", "v9"))]:
        with pytest.raises(InferenceServerException) as info:
            call(*args)
        assert info.value.status() == "StatusCode.NOT_FOUND"
    fake.ready = False
    assert not client.is_server_ready() and not client.is_model_ready("osteoporosis")
    client.close()


def test_v2_infer_raw_bytes_with_tritonclient(srv: Running, fake: FakePredictor) -> None:
    client = triton.InferenceServerClient(srv.target)
    tensor = triton.InferInput("image", [3], "BYTES")
    tensor.set_data_from_numpy(np.array(IMAGES[:3], dtype=np.object_))  # goes in raw_input_contents
    result = client.infer("osteoporosis", [tensor], request_id="t-1")
    assert result.get_response().id == "t-1" and result.get_response().model_version == "v1"
    assert result.get_response().raw_output_contents  # tritonclient reads FP32 only from raw outputs
    assert result.as_numpy("probability").dtype == np.float32
    assert result.as_numpy("probability") == pytest.approx([expected(i).probability for i in IMAGES[:3]], abs=1e-6)
    assert [v.decode() for v in result.as_numpy("label")] == [expected(i).label for i in IMAGES[:3]]

    only_label = client.infer("osteoporosis", [tensor], outputs=[triton.InferRequestedOutput("label")])
    assert only_label.as_numpy("probability") is None and len(only_label.as_numpy("label")) == 3

    bad = triton.InferInput("image", [2], "BYTES")
    bad.set_data_from_numpy(np.array([IMAGES[0], b"BAD"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        client.infer("osteoporosis", [bad])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "image 1" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("densenet", [tensor])
    assert info.value.status() == "StatusCode.NOT_FOUND" and "densenet" in info.value.message()
    client.close()


def _infer_request(images: list[bytes], **changes: object) -> vpb.ModelInferRequest:
    request = vpb.ModelInferRequest(model_name="osteoporosis", id="c-1")
    request.inputs.add(name="image", datatype="BYTES", shape=[len(images)]).contents.bytes_contents.extend(images)
    for field, value in changes.items():
        target = request.inputs[0] if field in ("name", "datatype") else request
        if field == "shape":
            del request.inputs[0].shape[:]
            request.inputs[0].shape.extend(value)
        else:
            setattr(target, field, value)
    return request


def test_v2_infer_bytes_contents_answers_in_contents(srv: Running, fake: FakePredictor) -> None:
    stub = vpb_grpc.GRPCInferenceServiceStub(srv.channel)
    response = stub.ModelInfer(_infer_request(IMAGES[:2]), timeout=5)
    assert response.id == "c-1" and not response.raw_output_contents
    out = {o.name: o for o in response.outputs}
    assert list(out["probability"].shape) == [2] and list(out["label"].shape) == [2]
    assert list(out["probability"].contents.fp32_contents) == pytest.approx(
        [expected(i).probability for i in IMAGES[:2]], abs=1e-6)
    assert [b.decode() for b in out["label"].contents.bytes_contents] == [expected(i).label for i in IMAGES[:2]]


def test_v2_malformed_tensors_are_invalid_argument(srv: Running, fake: FakePredictor) -> None:
    stub = vpb_grpc.GRPCInferenceServiceStub(srv.channel)
    raw = vpb.ModelInferRequest(model_name="osteoporosis")
    raw.inputs.add(name="image", datatype="BYTES", shape=[2])
    truncated = struct.pack("<I", 5) + b"abcde" + struct.pack("<I", 99) + b"xyz"
    trailing = struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b" + b"junk"
    cases = {
        "datatype BYTES": _infer_request(IMAGES[:1], datatype="UINT8"),
        "shape [N]": _infer_request(IMAGES[:1], shape=[1, 1]),
        "2 elements in bytes_contents": _infer_request(IMAGES[:2], shape=[3]),
        "exactly one input": _infer_request(IMAGES[:1], name="pixels"),
        "claims 99 bytes": _with_raw(raw, truncated),
        "4 bytes after": _with_raw(raw, trailing),
    }
    unknown_output = _infer_request(IMAGES[:1])
    unknown_output.outputs.add(name="heatmap")
    cases["unknown output"] = unknown_output
    for reason, request in cases.items():
        error = rpc_error(stub.ModelInfer, request, timeout=5)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in error.details(), (reason, error.details())


def _with_raw(template: vpb.ModelInferRequest, raw: bytes) -> vpb.ModelInferRequest:
    request = vpb.ModelInferRequest()
    request.CopyFrom(template)
    request.raw_input_contents.append(raw)
    return request


# --- health, reflection, stub generation ------------------------------------------------------------------------

def test_health_and_reflection(srv: Running, fake: FakePredictor) -> None:
    for service in ("", "osteoscreen.v1.Screening", "inference.GRPCInferenceService"):
        assert health_status(srv.channel, service) == health_pb2.HealthCheckResponse.SERVING
    assert rpc_error(health_status, srv.channel, "nope.Service").code() == grpc.StatusCode.NOT_FOUND

    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")]
    listed, found = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {"osteoscreen.v1.Screening", "inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert found.file_descriptor_response.file_descriptor_proto, found.error_response


def test_workers_share_one_port() -> None:
    """so_reuseport: every BentoML worker binds the same gRPC port, the kernel spreads connections."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first = Running(port=port)
    second = Running(port=port)
    try:
        assert first.port == second.port == port
        for running in (first, second):
            assert spb_grpc.ScreeningStub(running.channel).Predict(spb.PredictRequest(image=IMAGES[0]), timeout=5)
    finally:
        first.close()
        second.close()


def test_stubs_are_current_and_in_a_private_pool() -> None:
    assert codegen.is_current() and codegen.generate() is False  # idempotent: nothing to do
    # A private pool is what lets tritonclient (same `inference.*` names) be imported in this process.
    assert vpb.ModelInferRequest.DESCRIPTOR.file.pool is not descriptor_pool.Default()


# --- limits, deadlines, overload, metrics -------------------------------------------------------------------------

def test_message_over_the_size_limit_is_rejected_clearly() -> None:
    small = Running(max_message_bytes=256 * 1024)
    try:
        with ScreeningClient(small.target) as client:
            error = rpc_error(client.predict, b"\x89PNG" + bytes(300 * 1024), timeout=5)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in error.details(), error.details()
    finally:
        small.close()


def test_client_deadline_is_honoured(srv: Running, fake: FakePredictor) -> None:
    fake.delay = 5.0
    start = time.monotonic()
    error = rpc_error(spb_grpc.ScreeningStub(srv.channel).Predict, spb.PredictRequest(image=IMAGES[0]), timeout=0.3)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 2


def test_overload_is_resource_exhausted_not_a_hang(fake: FakePredictor, srv: Running) -> None:
    fake.overloaded = True
    error = rpc_error(spb_grpc.ScreeningStub(srv.channel).Predict, spb.PredictRequest(image=IMAGES[0]), timeout=5)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in error.details()

    busy = Running(max_concurrent=2)
    busy.predictor.delay = 1.5
    try:
        stub = spb_grpc.ScreeningStub(busy.channel)
        start = time.monotonic()
        calls = [stub.Predict.future(spb.PredictRequest(image=img), timeout=10) for img in IMAGES]
        refused = [c for c in calls if _code_when_done(c) == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(refused) == 3 and "limit 2" in refused[0].details()
        assert sum(c.code() == grpc.StatusCode.OK for c in calls) == 2
        assert health_status(busy.channel) == health_pb2.HealthCheckResponse.SERVING  # probes still answered
        assert time.monotonic() - start < 5
    finally:
        busy.close()


def _code_when_done(call: grpc.Future) -> grpc.StatusCode:
    call.exception(timeout=10)
    return call.code()


def test_metrics_count_calls_by_code(srv: Running, fake: FakePredictor) -> None:
    def count(code: str) -> float:
        labels = {"service": "osteoscreen.v1.Screening", "method": "Predict", "code": code}
        return REGISTRY.get_sample_value("osteoscreen_grpc_requests_total", labels) or 0.0

    rejected = lambda: REGISTRY.get_sample_value(  # noqa: E731
        "osteoscreen_rejected_requests_total", {"protocol": "grpc", "reason": "invalid_input"}) or 0.0
    before_ok, before_bad, before_rejected = count("OK"), count("INVALID_ARGUMENT"), rejected()
    stub = spb_grpc.ScreeningStub(srv.channel)
    stub.Predict(spb.PredictRequest(image=IMAGES[0]), timeout=5)
    rpc_error(stub.Predict, spb.PredictRequest(image=b"BAD"), timeout=5)
    # An aborted call's status reaches the client before the server-side bookkeeping ends: poll briefly.
    end = time.monotonic() + 2
    while (count("OK"), count("INVALID_ARGUMENT"), rejected()) != (before_ok + 1, before_bad + 1, before_rejected + 1):
        assert time.monotonic() < end, (count("OK"), count("INVALID_ARGUMENT"), rejected())
        time.sleep(0.01)
    assert REGISTRY.get_sample_value("osteoscreen_request_duration_seconds_count",
                                     {"protocol": "grpc", "api": "Predict"}) >= 2
    assert REGISTRY.get_sample_value("osteoscreen_inflight_requests", {"protocol": "grpc"}) == 0


# --- shutdown and the CLI helper ----------------------------------------------------------------------------------

def test_graceful_shutdown_finishes_inflight_and_refuses_new_calls() -> None:
    running = Running(shutdown_grace_s=10)
    running.predictor.delay = 1.5
    stub = spb_grpc.ScreeningStub(running.channel)
    try:
        calls = [stub.Predict.future(spb.PredictRequest(image=img, request_id=str(i)), timeout=10)
                 for i, img in enumerate(IMAGES[:4])]
        end = time.monotonic() + 5
        while running.server._guard.inflight < 4:
            assert time.monotonic() < end
            time.sleep(0.02)
        start = time.monotonic()
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(), running.loop)
        wait_for_health(running.channel, health_pb2.HealthCheckResponse.NOT_SERVING, timeout=1)
        error = rpc_error(stub.Predict, spb.PredictRequest(image=IMAGES[4]), timeout=2)
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()
        assert [c.result(timeout=5).request_id for c in calls] == ["0", "1", "2", "3"]
        stopping.result(timeout=5)
        assert time.monotonic() - start < 4  # drained, did not sit out the 10 s grace
        after = rpc_error(stub.Predict, spb.PredictRequest(image=IMAGES[0]), timeout=1)
        assert after.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.close()


def test_predict_files_remote_reports_each_file(srv: Running, fake: FakePredictor, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(IMAGES[1])
    bad.write_bytes(b"BAD not an image")
    out, err = io.StringIO(), io.StringIO()
    paths = [good, bad, tmp_path / "missing.png", good]
    assert predict_files_remote(paths, srv.target, out=out, err=err) == 1
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["path"] for line in lines] == [str(good), str(good)]
    assert lines[0]["label"] == expected(IMAGES[1]).label and lines[0]["model"] == "osteo-fake:v1"
    assert set(lines[0]) >= {"path", "probability", "label", "threshold", "model"}
    problems = err.getvalue().splitlines()
    assert len(problems) == 2 and "bad.png" in problems[0] and "INVALID_ARGUMENT" in problems[0]
    assert "missing.png" in problems[1] and "cannot read" in problems[1]
    assert predict_files_remote([good], "127.0.0.1:1", timeout=1, out=out, err=err) == 2


def test_client_tls_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="both client_cert and client_key"):
        ScreeningClient("localhost:1", tls=True, client_cert=b"cert")

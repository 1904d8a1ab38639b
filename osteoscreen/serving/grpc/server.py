"""The gRPC front end: one `grpc.aio` server with Screening, the v2 inference protocol, health and reflection.

BentoML 1.4 cannot serve gRPC for `@bentoml.service` classes, so `service.py` starts this server from an
on-startup hook in every worker (`grpc.so_reuseport` lets the workers share the port) and stops it from an
on-shutdown hook. Everything cross-cutting lives in `RpcGuard`, one interceptor for all services: admission
(bounded in-flight predictions, refusal while draining), the exception -> status code map, and metrics.

With `OSTEOSCREEN_TLS_CERT`/`_KEY` set the port speaks TLS (mutual TLS with `OSTEOSCREEN_TLS_CLIENT_CA`,
caller allow-list with `OSTEOSCREEN_ALLOWED_CLIENTS`; `osteoscreen/serving/grpc/tls.py`), and a second,
plaintext server on `OSTEOSCREEN_GRPC_HEALTH_PORT` answers grpc.health.v1 only, from the same health
servicer, for Kubernetes' gRPC probes, which cannot speak TLS (docs/deploy.md).

Shutdown drains instead of cutting: health turns NOT_SERVING, new predictions get UNAVAILABLE (clients retry
on another replica), in-flight ones finish within the grace period, then the server closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from osteoscreen import settings
from osteoscreen.security.redact import internal_error
from osteoscreen.security.tls import CertificateFiles, TLSSettings
from osteoscreen.serving.grpc import screening, v2
from osteoscreen.serving.grpc.tls import AllowedCallers, server_credentials
from osteoscreen.serving import metrics
from osteoscreen._generated import POOL
from osteoscreen import errors
from osteoscreen.errors import answer_for
from osteoscreen.serving.explanations import ExplainPath
from osteoscreen.types import Predictor

log = logging.getLogger("osteoscreen.grpc")

SERVED_SERVICES = (screening.SERVICE_NAME, v2.SERVICE_NAME)
PREDICTION_METHODS = {
    (screening.SERVICE_NAME, "Predict"),
    (screening.SERVICE_NAME, "PredictBatch"),
    (screening.SERVICE_NAME, "PredictStream"),
    (v2.SERVICE_NAME, "ModelInfer"),
}
# the rejection metric's reason for a status, also for the guard's own refusals (admission, draining)
REJECTION_REASONS = {grpc.StatusCode[code]: reason for _, _, code, reason in errors.TABLE}
_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
READINESS_POLL_S = 1.0
# RPCs beyond the prediction limit, so health checks still get through under load; few, because any RPC may
# carry a message of up to max_message_bytes and gRPC reads it whole before a handler sees it (docs/deploy.md)
CONTROL_HEADROOM = 8


@dataclass(frozen=True)
class GrpcSettings:
    """Server knobs; `from_env` takes them from the settings (`osteoscreen.settings`, the README's table), whose
    defaults these are."""

    port: int = settings.default("grpc_port")
    host: str = settings.default("grpc_host")
    max_message_bytes: int = settings.default("grpc_max_message_bytes")
    # prediction RPCs in flight per worker before RESOURCE_EXHAUSTED; with the message limit it bounds the bytes
    # gRPC holds: (max_concurrent + CONTROL_HEADROOM) x max_message_bytes (the worst case in docs/deploy.md)
    max_concurrent: int = settings.default("grpc_max_concurrent")
    shutdown_grace_s: float = settings.default("shutdown_grace_s")
    max_connection_age_s: float = settings.default("grpc_max_connection_age_s")
    tls: TLSSettings | None = None  # None: plaintext
    # with TLS: plaintext health-only port for probes (None: none; 0: any free)
    health_port: int | None = settings.default("grpc_health_port")

    @classmethod
    def from_env(cls, **overrides: Any) -> GrpcSettings:
        s = settings.current()
        values = dict(
            port=s.grpc_port, host=s.grpc_host, max_message_bytes=s.grpc_max_message_bytes,
            max_concurrent=s.grpc_max_concurrent, shutdown_grace_s=s.shutdown_grace_s,
            max_connection_age_s=s.grpc_max_connection_age_s, tls=TLSSettings.from_env(),
            health_port=s.grpc_health_port or None,
        )
        values.update(overrides)
        return cls(**values)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The error table's gRPC side (`osteoscreen.errors.answer_for`), for every servicer. Unknown errors get
    INTERNAL and a reference that is also in the server log, never their message."""
    answer = answer_for(exc)
    if answer is None:
        return grpc.StatusCode.INTERNAL, internal_error(log, "gRPC call", exc)
    return grpc.StatusCode[answer.grpc_code], answer.message


def _code_of(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return default
    return code if isinstance(code, grpc.StatusCode) else _CODES_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)


class RpcGuard(grpc.aio.ServerInterceptor):
    """Admission, error mapping and metrics around every RPC, so servicers stay thin."""

    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.inflight = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.lstrip("/").rpartition("/")
        predicts = (service, method) in PREDICTION_METHODS
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._wrap(behavior, service, method, predicts)})
        return handler

    def _wrap(self, behavior: Callable, service: str, method: str, predicts: bool) -> Callable:
        if inspect.isasyncgenfunction(behavior):
            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with self._guard(service, method, predicts, context):
                    async for response in behavior(request, context):
                        yield response
            return streaming

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._guard(service, method, predicts, context):
                return await behavior(request, context)
        return unary

    @contextlib.asynccontextmanager
    async def _guard(self, service: str, method: str, predicts: bool, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        admitted = False
        try:
            if predicts:
                await self._admit(context)
                admitted = True
            yield
            code = _code_of(context, grpc.StatusCode.OK)
        except grpc.aio.AbortError:
            code = _code_of(context, grpc.StatusCode.UNKNOWN)
            raise
        except Exception as exc:
            code, message = status_for(exc)
            await context.abort(code, message)
        except BaseException:  # cancelled by the client, its deadline, or shutdown
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        finally:
            if admitted:
                self._release(method, start, streaming=method == "PredictStream")
            self._record(service, method, code, predicts)

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if self.inflight >= self.max_inflight:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self.inflight} prediction calls in flight (limit {self.max_inflight}); "
                "retry with backoff",
            )
        self.inflight += 1
        self.idle.clear()
        metrics.INFLIGHT.labels(protocol="grpc").inc()

    def _release(self, method: str, start: float, streaming: bool) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()
        metrics.INFLIGHT.labels(protocol="grpc").dec()
        if not streaming:  # a stream's lifetime is not one request's latency
            metrics.REQUEST_DURATION.labels(protocol="grpc", api=method).observe(time.perf_counter() - start)

    @staticmethod
    def _record(service: str, method: str, code: grpc.StatusCode, predicts: bool) -> None:
        metrics.GRPC_REQUESTS.labels(service=service, method=method, code=code.name).inc()
        reason = REJECTION_REASONS.get(code)
        if predicts and reason:
            metrics.REJECTED.labels(protocol="grpc", reason=reason).inc()


def _register_in_pool(*files: Any) -> None:
    """Reflection reads one descriptor pool: ours, plus the health and reflection files from the default."""
    for file in files:
        try:
            POOL.FindFileByName(file.name)
        except KeyError:
            POOL.AddSerializedFile(file.serialized_pb)


class GrpcServer:
    """One worker's gRPC server. `await start()` binds and serves; `await stop()` drains and closes."""

    def __init__(self, predictor: Predictor, settings: GrpcSettings | None = None,
                 explainer: ExplainPath | None = None) -> None:
        self.predictor = predictor
        self.explainer = explainer
        self.settings = settings or GrpcSettings.from_env()
        self.port: int | None = None
        self.health_port: int | None = None  # the plaintext health-only port (TLS only)
        self.certificates: CertificateFiles | None = None
        self.health = health.aio.HealthServicer()
        self._guard = RpcGuard(self.settings.max_concurrent)
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._readiness: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None

    def _build(self) -> grpc.aio.Server:
        s = self.settings
        options = [
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
        ]
        if s.max_connection_age_s > 0:
            options += [("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(s.shutdown_grace_s * 1000))]
        interceptors: list[grpc.aio.ServerInterceptor] = [self._guard]
        if s.tls is not None and s.tls.allowed is not None:
            interceptors.append(AllowedCallers(s.tls.allowed))  # behind the guard, so refusals are counted
        server = grpc.aio.server(
            interceptors=interceptors, options=options,
            maximum_concurrent_rpcs=s.max_concurrent + CONTROL_HEADROOM,
        )
        screening.pb_grpc.add_ScreeningServicer_to_server(screening.ScreeningServicer(self.predictor, self.explainer), server)
        v2.pb_grpc.add_GRPCInferenceServiceServicer_to_server(v2.InferenceServicer(self.predictor), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        _register_in_pool(health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        names = (*SERVED_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server, pool=POOL)
        return server

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0). Health stays NOT_SERVING
        until the predictor is ready, so probes and load balancers never route to a cold replica."""
        for name in ("", *SERVED_SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server = self._build()
        address = f"{self.settings.host}:{self.settings.port}"
        tls = self.settings.tls
        try:
            if tls is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.certificates = CertificateFiles(tls)
                self.port = self._server.add_secure_port(address, server_credentials(self.certificates))
        except RuntimeError as exc:
            raise RuntimeError(f"cannot bind the gRPC port {address}: {exc}") from exc
        if tls is not None and self.settings.health_port is not None:
            await self._start_health_port()
        await self._server.start()
        self._readiness = asyncio.create_task(self._follow_readiness(), name="osteoscreen-grpc-readiness")
        mode = "plaintext" if tls is None else "mutual TLS" if tls.mutual else "TLS"
        log.info("gRPC serving on %s (port %s, %s%s)", address, self.port, mode,
                 f", allowed clients: {tls.allowed.describe()}" if tls and tls.allowed else "")
        return self.port

    async def _start_health_port(self) -> None:
        """grpc.health.v1 only, in plaintext, from the same servicer: probes see exactly what TLS clients see."""
        address = f"{self.settings.host}:{self.settings.health_port}"
        self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        try:
            self.health_port = self._health_server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot bind the gRPC health port {address}: {exc}") from exc
        await self._health_server.start()
        log.info("gRPC health (plaintext, grpc.health.v1 only) on %s (port %s)", address, self.health_port)

    async def _follow_readiness(self) -> None:
        last = None
        while True:
            try:
                ready = bool(self.predictor.is_ready())
            except Exception:  # a broken readiness check means not ready, not a dead poller
                log.exception("predictor.is_ready() failed")
                ready = False
            if ready != last:
                status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", *SERVED_SERVICES):
                    await self.health.set(name, status)
                last = ready
            await asyncio.sleep(READINESS_POLL_S)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and close; safe to call twice (the second call waits for the first)."""
        if self._stopping is None:
            grace = self.settings.shutdown_grace_s if grace is None else grace
            self._stopping = asyncio.create_task(self._drain(grace))
        await asyncio.shield(self._stopping)

    async def _drain(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        self._guard.draining = True
        if self._readiness is not None:
            self._readiness.cancel()
        await self.health.enter_graceful_shutdown()
        log.info("gRPC draining: %d prediction calls in flight, grace %.1fs", self._guard.inflight, grace)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._guard.idle.wait(), timeout=max(0.0, deadline - time.monotonic()))
        if self._server is not None:
            # What is left (health Watch streams, calls past the grace) is cancelled after a short moment.
            await self._server.stop(max(0.5, deadline - time.monotonic()) if self._guard.inflight else 0.5)
        if self._health_server is not None:
            await self._health_server.stop(0.5)
        log.info("gRPC stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

"""Async clients for the three APIs (HTTP /predict, gRPC Screening/Predict, v2 ModelInfer) that reduce every
answer to an outcome the benchmarks count: "ok", "rejected", "deadline" or "error:<what>"."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from loadtest.images import MiB, Sample
from osteoscreen.types import LABELS

PROTOCOLS = ("http", "grpc", "v2")
PROTOCOL_TITLES = {"http": "HTTP /predict", "grpc": "gRPC Screening/Predict", "v2": "gRPC v2 ModelInfer"}
REJECTED_HTTP = {503, 429}
REJECTED_GRPC = {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}

# One call: (sample, timeout seconds) -> outcome: "ok", "rejected" (503 / RESOURCE_EXHAUSTED / UNAVAILABLE),
# "deadline" (the client's deadline passed first), or "error:<what>".
Call = Callable[[Sample, float], Awaitable[str]]


class Clients:
    """Async clients for the three APIs over one HTTP session and one gRPC channel. `tls`: (CA, client
    certificate, client key) PEM paths for an HTTPS / TLS server (certificate and key may be None)."""

    def __init__(self, url: str, grpc_target: str, tls: tuple[str, str | None, str | None] | None = None) -> None:
        self.url, self.grpc_target, self.tls = url, grpc_target, tls
        self._session = None
        self._channel = None

    async def __aenter__(self) -> Clients:
        import aiohttp
        import grpc

        from osteoscreen import codegen

        codegen.ensure_stubs()
        from osteoscreen._generated.inference import grpc_predict_v2_pb2 as v2_pb
        from osteoscreen._generated.inference import grpc_predict_v2_pb2_grpc as v2_grpc
        from osteoscreen._generated.osteoscreen.v1 import screening_pb2 as pb
        from osteoscreen._generated.osteoscreen.v1 import screening_pb2_grpc as pb_grpc

        self._grpc, self._pb, self._v2_pb = grpc, pb, v2_pb
        options = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
        if self.tls:
            import ssl
            from pathlib import Path

            ca, cert, key = self.tls
            context = ssl.create_default_context(cafile=ca)
            if cert:
                context.load_cert_chain(cert, key)
            connector = aiohttp.TCPConnector(limit=0, force_close=False, ssl=context)
            credentials = grpc.ssl_channel_credentials(Path(ca).read_bytes(), Path(key).read_bytes() if key else None,
                                                       Path(cert).read_bytes() if cert else None)
            self._channel = grpc.aio.secure_channel(self.grpc_target, credentials, options=options)
        else:
            connector = aiohttp.TCPConnector(limit=0, force_close=False)
            self._channel = grpc.aio.insecure_channel(self.grpc_target, options=options)
        self._session = aiohttp.ClientSession(connector=connector)
        self._screening = pb_grpc.ScreeningStub(self._channel)
        self._v2 = v2_grpc.GRPCInferenceServiceStub(self._channel)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._session.close()
        await self._channel.close()

    def call(self, protocol: str) -> Call:
        return {"http": self.http, "grpc": self.grpc, "v2": self.v2}[protocol]

    async def http(self, sample: Sample, timeout: float) -> str:
        import aiohttp

        try:
            async with self._session.post(
                f"{self.url}/predict", data=sample.data,
                headers={"Content-Type": sample.content_type, "X-Request-Timeout": f"{timeout:g}"},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                body = await response.read()
                if response.status == 200:
                    answer = json.loads(body)
                    return "ok" if answer.get("label") in LABELS else "error:bad-answer"
                if response.status in REJECTED_HTTP:
                    return "rejected"
                if response.status == 504:
                    return "deadline"
                return f"error:http-{response.status}"
        except asyncio.TimeoutError:
            return "deadline"
        except aiohttp.ClientError as exc:
            return f"error:{type(exc).__name__}"

    async def _grpc_outcome(self, coro: Awaitable, check: Callable[[object], bool]) -> str:
        try:
            response = await coro
        except self._grpc.aio.AioRpcError as exc:
            name = exc.code().name
            if name in REJECTED_GRPC:
                return "rejected"
            if name == "DEADLINE_EXCEEDED":
                return "deadline"
            return f"error:{name}"
        return "ok" if check(response) else "error:bad-answer"

    async def grpc(self, sample: Sample, timeout: float) -> str:
        request = self._pb.PredictRequest(image=sample.data, format=sample.format)
        return await self._grpc_outcome(self._screening.Predict(request, timeout=timeout),
                                        lambda r: r.label in LABELS)

    async def v2(self, sample: Sample, timeout: float) -> str:
        from osteoscreen.serving.grpc.v2 import encode_raw_bytes  # grpc + numpy only

        request = self._v2_pb.ModelInferRequest(model_name="osteoporosis")
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(encode_raw_bytes([sample.data]))
        return await self._grpc_outcome(self._v2.ModelInfer(request, timeout=timeout),
                                        lambda r: len(r.outputs) == 2)

"""A small synchronous Python client for the `osteoscreen.v1.Screening` gRPC API, for platform integrators.

    from osteoscreen.client import ScreeningClient
    with ScreeningClient("osteoscreen.example.org:443", tls=True) as client:
        result = client.predict("spine.dcm", request_id="study-123")
        print(result.probability, result.label)

Failures raise `grpc.RpcError` (`.code()`, `.details()`): INVALID_ARGUMENT for a bad image (do not retry),
RESOURCE_EXHAUSTED when the server is busy or the file too large, DEADLINE_EXCEEDED after `timeout`.
UNAVAILABLE is retried automatically (a few attempts with backoff): replicas answer it while shutting down.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import grpc
import numpy as np

from osteoscreen import codegen
from osteoscreen.types import DicomResults, Prediction

codegen.ensure_stubs()
from osteoscreen._generated.osteoscreen.v1 import screening_pb2 as pb  # noqa: E402
from osteoscreen._generated.osteoscreen.v1 import screening_pb2_grpc as pb_grpc  # noqa: E402

ImageSource = Union[bytes, str, os.PathLike]
PemSource = Union[bytes, str, os.PathLike]
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_RETRY_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "osteoscreen.v1.Screening"}],
        "retryPolicy": {
            "maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})


@dataclass(frozen=True)
class RemotePrediction(Prediction):
    """A Prediction as the server answered it, with the request id echoed back."""

    request_id: str = ""


@dataclass(frozen=True)
class RemoteExplanation:
    """An Explain answer: the prediction, the map (float32 [h, w], sums to forest_output - expected_value)
    and the PNG overlay."""

    prediction: RemotePrediction
    attribution: np.ndarray
    forest_output: float
    expected_value: float
    overlay_png: bytes


def _read_pem(source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def _read_image(source: ImageSource) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def to_result(response: pb.PredictResponse) -> RemotePrediction:
    return RemotePrediction(
        probability=response.probability, label=response.label, threshold=response.threshold,
        model=response.model_name, version=response.model_version, request_id=response.request_id,
        dicom=DicomResults(response.dicom_sr, response.dicom_sr_sop_instance_uid, tuple(response.dicom_images))
        if response.dicom_sr else None,
    )


class ScreeningClient:
    """One channel to an OsteoScreen server; thread-safe; use as a context manager or call close().

    TLS: `tls=True` uses the system's root certificates unless `root_certificates` (PEM bytes or a CA file
    path) is given; `client_cert` + `client_key` add mutual TLS; `server_name` overrides the name checked
    against the server certificate. Giving any certificate implies TLS."""

    def __init__(
        self,
        target: str,
        tls: bool = False,
        root_certificates: PemSource | None = None,
        *,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        server_name: str | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.target = target
        self.timeout = timeout
        options: list[tuple[str, object]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.service_config", _RETRY_CONFIG),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.secure = bool(tls or root_certificates is not None or client_cert is not None)
        if self.secure:
            if (client_cert is None) != (client_key is None):
                raise ValueError("mutual TLS needs both client_cert and client_key")
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(root_certificates),
                private_key=_read_pem(client_key),
                certificate_chain=_read_pem(client_cert),
            )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.ScreeningStub(self._channel)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects; raises grpc.FutureTimeoutError if it does not in time."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    @staticmethod
    def request(image: ImageSource, request_id: str | None = None, format: str | None = None,
                dicom_results: bool = False) -> pb.PredictRequest:
        return pb.PredictRequest(image=_read_image(image), format=format or "", request_id=request_id or "",
                                 dicom_results=dicom_results)

    def predict(
        self, image: ImageSource, request_id: str | None = None, format: str | None = None, timeout: float | None = None,
        dicom_results: bool = False,
    ) -> RemotePrediction:
        """Screen one image (bytes of an encoded file, or a path). `dicom_results=True` (DICOM input only) also
        returns the DICOM SR a PACS stores, in `.dicom`."""
        request = self.request(image, request_id, format, dicom_results)
        response = self._stub.Predict(request, timeout=timeout or self.timeout)
        return to_result(response)

    def explain(self, image: ImageSource, request_id: str | None = None, format: str | None = None,
                timeout: float | None = None, dicom_results: bool = False) -> RemoteExplanation:
        """Screen one image and explain the result (the server's explanation queue is small: a busy server
        answers RESOURCE_EXHAUSTED; retry later). `dicom_results=True` (DICOM input only): `.prediction.dicom`
        holds the SR and the overlay as a DICOM Secondary Capture (`.images[0]`)."""
        import numpy as np

        r = self._stub.Explain(self.request(image, request_id, format, dicom_results), timeout=timeout or self.timeout)
        attribution = np.asarray(r.map, dtype=np.float32).reshape(tuple(r.map_shape))
        return RemoteExplanation(to_result(r.prediction), attribution, r.forest_output, r.expected_value,
                                 r.overlay_png)

    def predict_many(
        self,
        images: Iterable[ImageSource],
        request_ids: Sequence[str] | None = None,
        format: str | None = None,
        batch_size: int = 8,
        timeout: float | None = None,
    ) -> list[RemotePrediction]:
        """Screen several images with PredictBatch, `batch_size` per call; results in input order.
        A bad image fails its whole batch (INVALID_ARGUMENT naming its index within the batch)."""
        requests = [self.request(img, request_ids[i] if request_ids else None, format) for i, img in enumerate(images)]
        results: list[RemotePrediction] = []
        for start in range(0, len(requests), batch_size):
            batch = pb.PredictBatchRequest(requests=requests[start : start + batch_size])
            response = self._stub.PredictBatch(batch, timeout=timeout or self.timeout)
            results.extend(to_result(r) for r in response.responses)
        return results

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ScreeningClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

"""`osteoscreen.v1.Screening`: our own gRPC API, a thin layer over `Predictor.predict`.

Servicers only translate messages. Domain errors (ImageDecodeError, OverloadedError, TimeoutError) are left
to propagate: `grpc_server`'s interceptor maps them to status codes for every service in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc

from osteoscreen import codegen
from osteoscreen.errors import ImageDecodeError, ModelUnavailableError, OutOfIntendedUseError
from osteoscreen.serving.explanations import ExplainPath
from osteoscreen.types import Prediction, Predictor

codegen.ensure_stubs()
from osteoscreen._generated.osteoscreen.v1 import screening_pb2 as pb  # noqa: E402
from osteoscreen._generated.osteoscreen.v1 import screening_pb2_grpc as pb_grpc  # noqa: E402

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Screening"].full_name  # "osteoscreen.v1.Screening"
FORMAT_HINTS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "dicom": "dicom", "dcm": "dicom"}
STREAM_WINDOW = 16  # requests of one PredictStream processed at once (bounded, so one stream cannot hog)


async def predict_in_context(
    predictor: Predictor, images: Sequence[bytes], hints: Sequence[str | None] | None, context: grpc.aio.ServicerContext,
    dicom: Sequence[bool] | None = None,
) -> list[Prediction]:
    """Call the one inference path with the caller's remaining deadline as its timeout.

    The `asyncio.timeout` guard makes the deadline hold even if a predictor overlooks `timeout`; the
    TimeoutError it raises becomes DEADLINE_EXCEEDED in the interceptor."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise TimeoutError("the deadline passed before the request could be queued")
    async with asyncio.timeout(remaining):
        return await predictor.predict(images, hints, timeout=remaining, dicom=dicom)


def format_hint(value: str) -> str | None:
    """Normalize the optional format hint; an unknown one is the caller's mistake (INVALID_ARGUMENT)."""
    if not value:
        return None
    try:
        return FORMAT_HINTS[value.strip().lower()]
    except KeyError:
        raise ImageDecodeError(f"unknown format hint {value!r}; use png, jpeg or dicom, or leave it empty") from None


def to_response(prediction: Prediction, request_id: str) -> pb.PredictResponse:
    dicom = prediction.dicom
    return pb.PredictResponse(
        probability=prediction.probability,
        label=prediction.label,
        threshold=prediction.threshold,
        model_name=prediction.model,
        model_version=prediction.version,
        request_id=request_id,
        outside_intended_use=bool(prediction.findings),
        intended_use_findings=[pb.IntendedUseFinding(check=f.check, value=f.value, reason=f.reason)
                               for f in prediction.findings],
        cautions=[pb.IntendedUseFinding(check=f.check, value=f.value, reason=f.reason) for f in prediction.cautions],
        dicom_sr=dicom.sr if dicom else b"",
        dicom_images=list(dicom.images) if dicom else [],
        dicom_sr_sop_instance_uid=dicom.sr_sop_instance_uid if dicom else "",
    )


def _dicom(requests: Sequence[pb.PredictRequest]) -> list[bool] | None:
    wanted = [r.dicom_results for r in requests]
    return wanted if any(wanted) else None


def _check(requests: Sequence[pb.PredictRequest]) -> list[str | None] | None:
    """Reject empty images here, with the index, before they take a place in the model's queue."""
    for i, request in enumerate(requests):
        if not request.image:
            where = f"request {i}" if len(requests) > 1 else "the request"
            raise ImageDecodeError(f"{where} has an empty image field")
    hints = [format_hint(r.format) for r in requests]
    return hints if any(hints) else None


class ScreeningServicer(pb_grpc.ScreeningServicer):
    """Unary, batch and streaming forms; all reach the same `Predictor.predict`. `Explain` goes its own way
    (`osteoscreen.serving.explanations`), off the screening queue."""

    def __init__(self, predictor: Predictor, explainer: ExplainPath | None = None) -> None:
        self._predictor = predictor
        self._explainer = explainer

    async def Explain(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        if self._explainer is None:
            raise ModelUnavailableError("explanations are not served by this replica")
        hints = _check([request])
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise TimeoutError("the deadline passed before the request could be queued")
        # dicom_results: the SR and the overlay as a Secondary Capture, in prediction.dicom_sr / dicom_images
        result = await self._explainer.explain(request.image, hints[0] if hints else None, timeout=remaining,
                                               protocol="grpc", dicom=request.dicom_results)
        return pb.ExplainResponse(
            prediction=to_response(result.prediction, request.request_id),
            map=result.attribution.ravel().tolist(), map_shape=list(result.attribution.shape),
            forest_output=result.forest_output, expected_value=result.expected_value,
            overlay_png=result.overlay_png,
        )

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        hints = _check([request])
        (prediction,) = await predict_in_context(self._predictor, [request.image], hints, context, _dicom([request]))
        return to_response(prediction, request.request_id)

    async def PredictBatch(
        self, request: pb.PredictBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictBatchResponse:
        requests = list(request.requests)
        if not requests:
            return pb.PredictBatchResponse()
        hints = _check(requests)
        predictions = await predict_in_context(self._predictor, [r.image for r in requests], hints, context,
                                               _dicom(requests))
        return pb.PredictBatchResponse(
            responses=[to_response(p, r.request_id) for p, r in zip(predictions, requests, strict=True)]
        )

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictResponse]:
        """Up to STREAM_WINDOW requests in flight at once (so they can share a model batch); answers are
        yielded as they complete, matched by request_id. Reading pauses while the window is full."""
        requests = aiter(request_iterator)
        reading: asyncio.Future[pb.PredictRequest] | None = None
        exhausted = False
        pending: set[asyncio.Task[pb.PredictResponse]] = set()
        try:
            while True:
                if reading is None and not exhausted and len(pending) < STREAM_WINDOW:
                    reading = asyncio.ensure_future(anext(requests))
                waiting: set[asyncio.Future] = pending | ({reading} if reading is not None else set())
                if not waiting:
                    return
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if reading is not None and reading in done:
                    try:
                        pending.add(asyncio.create_task(self._one(reading.result(), context)))
                    except StopAsyncIteration:
                        exhausted = True
                    reading = None
                for task in done & pending:
                    pending.discard(task)
                    yield task.result()
        finally:
            for future in [*pending, *([reading] if reading is not None else [])]:
                future.cancel()
                if future.done() and not future.cancelled():
                    future.exception()  # a second failure: mark it seen, so asyncio does not log it as lost

    async def _one(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        try:
            return await self.Predict(request, context)
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"request_id {request.request_id!r}: {exc}") from exc
        except OutOfIntendedUseError as exc:
            raise OutOfIntendedUseError(f"request_id {request.request_id!r}: {exc}", exc.findings) from exc

"""`POST /predict` over HTTP: the image as multipart field `image` or as the raw request body; the optional
header `X-Request-Timeout` (seconds, default and cap 60) is the caller's deadline. With `Accept:
application/dicom` (DICOM input only) the answer is the DICOM SR file a PACS stores, the result in headers;
`POST /explain` with it answers the SR and the explanation overlay (a Secondary Capture) together, as DICOMweb
carries several instances: `multipart/related; type="application/dicom"`. `POST /dicom-web/studies` is the DICOM node's STOW-RS intake
(`osteoscreen.serving.dicom.stow`). An image outside the model's
intended use gets 422 with the reason (policy `refuse`), or the answer plus `out_of_intended_use` (policy `flag`).

A small Starlette app mounted into the BentoML service, rather than a `@bentoml.api`, because the
contract takes both body forms and must answer bad input with a plain 400 and its reason; BentoML's
file inputs would also fetch URLs given in the body, which a screening server must never do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from osteoscreen.security.redact import internal_error
from osteoscreen.serving import metrics
from osteoscreen.serving.dicom import stow
from osteoscreen.errors import ImageDecodeError, answer_for
from osteoscreen.imaging.decode import MAX_BYTES
from osteoscreen.types import Prediction, Predictor

log = logging.getLogger("osteoscreen.http")

REQUEST_TIMEOUT_S = 60.0
# The caller's deadline in seconds, like gRPC's: a request the queue ahead would keep past it is refused at once.
TIMEOUT_HEADER = "x-request-timeout"


def _error(status: int, message: str, reason: str | None = None) -> JSONResponse:
    if reason:
        metrics.REJECTED.labels(protocol="http", reason=reason).inc()
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _refusal(exc: Exception, timeout: float | None, api: str, counted: bool) -> JSONResponse:
    """The error table's HTTP side; anything it does not list is a bug: 500 with a reference, logged as types
    and code locations only. `counted`: a screening call, whose refusals the rejection metric counts."""
    answer = answer_for(exc, timeout)
    if answer is None:
        return _error(500, internal_error(log, f"HTTP {api}", exc))
    return _error(answer.http_status, answer.message, answer.reason if counted else None)


async def _read_image(request: Request) -> tuple[bytes, str | None]:
    """The uploaded file and its format hint (from the part's or the request's content type)."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > MAX_BYTES + 1024 * 1024:
        raise ImageDecodeError(f"request of {declared} bytes exceeds the {MAX_BYTES}-byte limit")
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ImageDecodeError("multipart request has no file field 'image'")
        return await upload.read(), _hint(upload.content_type)
    return await request.body(), _hint(content_type)


def _timeout(request: Request) -> float | None:
    """Seconds the caller will wait (at most REQUEST_TIMEOUT_S); None if the header is unusable."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return REQUEST_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        return None
    return min(value, REQUEST_TIMEOUT_S) if value > 0 else None


def _wants_dicom(request: Request) -> bool:
    """`Accept: application/dicom` (with q > 0) asks for the DICOM SR instead of JSON."""
    for media_range in request.headers.get("accept", "").split(","):
        media_type, *params = (part.strip().lower() for part in media_range.split(";"))
        if media_type == "application/dicom":
            return not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params)
    return False


def _wants_dicom_parts(request: Request) -> bool:
    """`Accept: application/dicom`, or DICOMweb's `multipart/related; type="application/dicom"` (q > 0)."""
    if _wants_dicom(request):
        return True
    for media_range in request.headers.get("accept", "").split(","):
        media_type, *params = (part.strip().lower() for part in media_range.split(";"))
        params = [p.replace(" ", "").replace('"', "") for p in params]
        if media_type == "multipart/related" and "type=application/dicom" in params:
            return not any(p in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params)
    return False


def _dicom_response(prediction: Prediction, with_images: bool = False) -> Response:
    """The SR as the body (`with_images`: the SR, then its result images, as one multipart/related answer); the
    result in headers too, so a caller need not parse DICOM to route it."""
    assert prediction.dicom is not None
    headers = {
        "X-OsteoScreen-Probability": f"{prediction.probability:.6f}",
        "X-OsteoScreen-Label": prediction.label,
        "X-OsteoScreen-Threshold": f"{prediction.threshold:.6f}",
        "X-OsteoScreen-Model": f"{prediction.model}:{prediction.version}",
        "X-OsteoScreen-SR-Instance-UID": prediction.dicom.sr_sop_instance_uid,
    }
    if prediction.findings:  # the SR says so too; a router need not parse it to keep it out of a worklist
        headers["X-OsteoScreen-Outside-Intended-Use"] = ",".join(dict.fromkeys(f.check for f in prediction.findings))
    if prediction.cautions:  # answered, with the SR's caution: an unusual image
        headers["X-OsteoScreen-Caution"] = ",".join(dict.fromkeys(f.check for f in prediction.cautions))
    if not with_images:
        return Response(prediction.dicom.sr, media_type="application/dicom", headers=headers)
    body, content_type = multipart_related([prediction.dicom.sr, *prediction.dicom.images])
    return Response(body, headers={**headers, "Content-Type": content_type})


def multipart_related(instances: list[bytes]) -> tuple[bytes, str]:
    """DICOM instances as one `multipart/related; type="application/dicom"` body (RFC 2387, DICOMweb PS3.18
    8.6.1.2: each part a whole Part 10 file), and its Content-Type with the boundary."""
    boundary = uuid.uuid4().hex
    while any(boundary.encode() in part for part in instances):  # a boundary must not occur in the data
        boundary = uuid.uuid4().hex
    mark = f"--{boundary}".encode()
    body = b"".join(mark + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in instances)
    return body + mark + b"--\r\n", f'multipart/related; type="application/dicom"; boundary={boundary}'


def _hint(content_type: str | None) -> str | None:
    subtype = (content_type or "").split(";")[0].strip().lower()
    return {"image/png": "png", "image/jpeg": "jpeg", "application/dicom": "dicom"}.get(subtype)


async def predict(request: Request) -> Response:
    predictor: Predictor | None = request.app.state.predictor
    if predictor is None:
        return _error(503, "the server is starting; retry shortly", "unavailable")
    timeout = _timeout(request)
    if timeout is None:
        return _error(400, f"header {TIMEOUT_HEADER} must be a positive number of seconds", "invalid_input")
    started = time.perf_counter()
    metrics.INFLIGHT.labels(protocol="http").inc()
    try:
        data, hint = await _read_image(request)
        dicom = _wants_dicom(request)
        prediction = (await predictor.predict([data], [hint], timeout=timeout, dicom=[dicom]))[0]
        return _dicom_response(prediction) if dicom else JSONResponse(_summary(prediction))
    except Exception as exc:  # the error table; a bug answers a reference, logged without the request's data
        return _refusal(exc, timeout, "/predict", counted=True)
    finally:
        metrics.INFLIGHT.labels(protocol="http").dec()
        metrics.REQUEST_DURATION.labels(protocol="http", api="predict").observe(time.perf_counter() - started)


def _summary(p: Prediction) -> dict:
    """The JSON answer; `out_of_intended_use` only under the `flag` policy: the checks this image failed;
    `cautions` under either, for an unusual image (the content check's borderline band)."""
    body = {"probability": p.probability, "label": p.label, "threshold": p.threshold, "model": f"{p.model}:{p.version}"}
    if p.findings:
        body["out_of_intended_use"] = [asdict(f) for f in p.findings]
    if p.cautions:
        body["cautions"] = [asdict(f) for f in p.cautions]
    return body


def _wants_png(accept: str) -> bool:
    """`Accept: image/png` (preferred over JSON when both are listed) asks for the overlay; anything else
    gets JSON with the map."""
    kinds = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if "image/png" not in kinds:
        return False
    return "application/json" not in kinds or kinds.index("image/png") < kinds.index("application/json")


async def explain(request: Request) -> Response:
    """`POST /explain`: the same input as /predict; answers the PNG overlay (`Accept: image/png`), JSON with
    the prediction and the map, or (`Accept: application/dicom`, DICOM input only) the SR and the overlay as a
    DICOM Secondary Capture in one multipart/related answer. Its own queue (`osteoscreen.serving.explanations`):
    never slows /predict. Refusals are counted by `osteoscreen_explanations_total`, not among the screening
    rejections."""
    explainer = getattr(request.app.state, "explainer", None)
    if explainer is None:
        return _error(503, "the server is starting; retry shortly")
    timeout = _timeout(request)
    if timeout is None:
        return _error(400, f"header {TIMEOUT_HEADER} must be a positive number of seconds")
    try:
        data, hint = await _read_image(request)
        dicom = _wants_dicom_parts(request)
        result = await explainer.explain(data, hint, timeout=timeout, protocol="http", dicom=dicom)
        p = result.prediction
        if dicom:
            return _dicom_response(p, with_images=True)
        summary = _summary(p)
        if _wants_png(request.headers.get("accept", "")):
            headers = {f"X-Osteoscreen-{k.title()}": str(summary[k]) for k in ("probability", "label", "threshold",
                                                                                 "model")}
            return Response(result.overlay_png, media_type="image/png", headers=headers)
        return JSONResponse({**summary, "forest_output": result.forest_output, "expected_value": result.expected_value,
                             "shape": list(result.attribution.shape), "map": result.attribution.tolist()})
    except Exception as exc:  # as /predict, but counted by osteoscreen_explanations_total instead
        return _refusal(exc, timeout, "/explain", counted=False)


def create_app(predictor: Predictor | None = None) -> Starlette:
    """The app; `service.py` sets `app.state.predictor` (and `app.state.explainer`) once its worker has built
    the inference path."""
    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/explain", explain, methods=["POST"]),
                            Route("/dicom-web/studies", stow.store_instances, methods=["POST"]),
                            Route("/dicom-web/studies/{study}", stow.store_instances, methods=["POST"])])
    app.state.predictor = predictor
    app.state.explainer = None
    app.state.outbox = None  # the DICOM node's outbox, for STOW-RS intake (set when the node is on)
    return app

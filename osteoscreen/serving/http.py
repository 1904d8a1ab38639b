"""`POST /predict` over HTTP: the image as multipart field `image` or as the raw request body; the optional
header `X-Request-Timeout` (seconds, default and cap 60) is the caller's deadline.

A small Starlette app mounted into the BentoML service, rather than a `@bentoml.api`, because the
contract takes both body forms and must answer bad input with a plain 400 and its reason; BentoML's
file inputs would also fetch URLs given in the body, which a screening server must never do.
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from osteoscreen.security.redact import traceback_without_messages
from osteoscreen.serving import metrics
from osteoscreen.errors import ImageDecodeError, ModelUnavailableError, OverloadedError
from osteoscreen.imaging.decode import MAX_BYTES
from osteoscreen.types import Predictor

log = logging.getLogger("osteoscreen.http")

REQUEST_TIMEOUT_S = 60.0
# The caller's deadline in seconds, like gRPC's: a request the queue ahead would keep past it is refused at once.
TIMEOUT_HEADER = "x-request-timeout"


def _error(status: int, message: str, reason: str | None = None) -> JSONResponse:
    if reason:
        metrics.REJECTED.labels(protocol="http", reason=reason).inc()
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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


def _hint(content_type: str | None) -> str | None:
    subtype = (content_type or "").split(";")[0].strip().lower()
    return {"image/png": "png", "image/jpeg": "jpeg", "application/dicom": "dicom"}.get(subtype)


async def predict(request: Request) -> JSONResponse:
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
        prediction = (await predictor.predict([data], [hint], timeout=timeout))[0]
    except ImageDecodeError as exc:
        return _error(400, str(exc), "invalid_input")
    except OverloadedError as exc:
        return _error(503, str(exc), "overloaded")
    except ModelUnavailableError as exc:
        return _error(503, str(exc), "unavailable")
    except TimeoutError:
        return _error(504, f"no answer within {timeout:g}s", "deadline")
    except Exception as exc:  # a bug: answer with a reference, log it without what the request carried
        ref = uuid.uuid4().hex[:12]
        log.error("internal error in HTTP call (ref %s)\n%s", ref, traceback_without_messages(exc))
        return _error(500, f"internal server error (ref {ref}); see the server log")
    finally:
        metrics.INFLIGHT.labels(protocol="http").dec()
        metrics.REQUEST_DURATION.labels(protocol="http", api="predict").observe(time.perf_counter() - started)
    return JSONResponse({
        "probability": prediction.probability,
        "label": prediction.label,
        "threshold": prediction.threshold,
        "model": f"{prediction.model}:{prediction.version}",
    })


def create_app(predictor: Predictor | None = None) -> Starlette:
    """The app; `service.py` sets `app.state.predictor` once its worker has built the inference path."""
    app = Starlette(routes=[Route("/predict", predict, methods=["POST"])])
    app.state.predictor = predictor
    return app

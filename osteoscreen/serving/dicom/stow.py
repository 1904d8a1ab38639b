"""STOW-RS intake (DICOMweb, PS3.18 10.5): `POST /dicom-web/studies[/{StudyInstanceUID}]` with
`multipart/related; type="application/dicom"`, into the same outbox the C-STORE listener fills.

The answer is the standard Store Instances response (`application/dicom+json`): each instance in
ReferencedSOPSequence (kept) or FailedSOPSequence (with a FailureReason), and the HTTP status PS3.18 gives:
200 all kept, 202 some kept, 409 none kept, 400 a body that is not a multipart/related message, 415 parts that
are not `application/dicom`. As for C-STORE, an instance is answered success only once the outbox has committed
it, and an instance outside the intended use is kept (then skipped by the node's worker), so a router never
re-sends it. Screening and store-back are the node's worker's job, in whichever front worker owns the outbox;
any worker may take a STOW-RS request, because SQLite in WAL mode takes writers from several processes.

It runs inside the HTTP app, so TLS, mTLS and the client allow-list apply to it as to `/predict`. Nothing that
names a patient goes to a log line or a failure: failures carry the instance's UIDs (the sender's own
identifiers for what it sent) and a status code.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass

import pydicom
import python_multipart
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from osteoscreen.imaging.decode import MAX_BYTES
from osteoscreen.serving import metrics
from osteoscreen.serving.dicom.outbox import Outbox
from osteoscreen.serving.dicom.scp import STORAGE

log = logging.getLogger("osteoscreen.dicom")

MAX_PARTS = 256  # a study of radiographs is a few images; a bigger message is more likely a mistake than a study
# PS3.4 Annex B / PS3.18 10.5.3 failure reasons
OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND, SOP_CLASS_NOT_SUPPORTED = 0xA700, 0xA900, 0xC000, 0x0122
DICOM_JSON = "application/dicom+json"


@dataclass(frozen=True)
class Outcome:
    sop_class_uid: str
    sop_instance_uid: str
    failure: int | None = None  # None: kept


def parts(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(content type, bytes) of each part of a multipart/related body (python-multipart's streaming parser, the
    one Starlette uses for forms). ValueError when the body is not such a message."""
    kind, options = python_multipart.multipart.parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/related" or not boundary:
        raise ValueError("the body must be multipart/related with a boundary")
    found: list[tuple[str, bytes]] = []
    state = {"field": b"", "headers": {}, "data": []}

    def begin() -> None:
        state["headers"], state["data"] = {}, []

    def header_field(data: bytes, start: int, end: int) -> None:
        state["field"] = data[start:end].lower()

    def header_value(data: bytes, start: int, end: int) -> None:
        state["headers"][state["field"]] = state["headers"].get(state["field"], b"") + data[start:end]

    def part_data(data: bytes, start: int, end: int) -> None:
        state["data"].append(data[start:end])

    def end() -> None:
        if len(found) >= MAX_PARTS:
            raise ValueError(f"more than {MAX_PARTS} instances in one request")
        found.append((state["headers"].get(b"content-type", b"").decode("latin-1"), b"".join(state["data"])))

    parser = python_multipart.MultipartParser(boundary, {
        "on_part_begin": begin, "on_header_field": header_field, "on_header_value": header_value,
        "on_part_data": part_data, "on_part_end": end})
    try:
        parser.write(body)
        parser.finalize()
    except python_multipart.exceptions.MultipartParseError as exc:
        raise ValueError("the multipart body could not be parsed") from exc
    if not found:
        raise ValueError("the multipart body holds no part")
    return found


def keep(outbox: Outbox, data: bytes, study: str | None) -> Outcome:
    """Read one part's identifiers (the header only) and commit it to the outbox; the outcome for the answer."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    except Exception:  # noqa: BLE001 - not DICOM, or no identifiers: the sender learns it cannot be understood
        return Outcome("", "", CANNOT_UNDERSTAND)
    if sop_class not in STORAGE:
        return Outcome(sop_class, sop_instance, SOP_CLASS_NOT_SUPPORTED)
    if study and str(ds.get("StudyInstanceUID", "")) != study:
        return Outcome(sop_class, sop_instance, DOES_NOT_MATCH)
    try:
        outbox.accept(sop_instance, sop_class, data)
    except Exception as exc:  # noqa: BLE001 - not kept: the sender must retry; the message may quote a path
        log.warning("STOW-RS instance not accepted: the outbox failed (%s)", type(exc).__name__)
        return Outcome(sop_class, sop_instance, OUT_OF_RESOURCES)
    return Outcome(sop_class, sop_instance)


def response_body(outcomes: list[Outcome]) -> dict:
    """The Store Instances response in the DICOM JSON model (PS3.18 F.2)."""
    def item(o: Outcome) -> dict:
        entry = {"00081150": {"vr": "UI", "Value": [o.sop_class_uid]} if o.sop_class_uid else {"vr": "UI"},
                 "00081155": {"vr": "UI", "Value": [o.sop_instance_uid]} if o.sop_instance_uid else {"vr": "UI"}}
        if o.failure is not None:
            entry["00081197"] = {"vr": "US", "Value": [o.failure]}
        return entry

    body: dict = {}
    kept = [item(o) for o in outcomes if o.failure is None]
    failed = [item(o) for o in outcomes if o.failure is not None]
    if kept:
        body["00081199"] = {"vr": "SQ", "Value": kept}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    return body


def _status(outcomes: list[Outcome]) -> int:
    kept = sum(o.failure is None for o in outcomes)
    return 200 if kept == len(outcomes) else 202 if kept else 409


async def store_instances(request: Request) -> Response:
    """The route. `request.app.state.outbox` is set by `service.py` when the DICOM node is on."""
    outbox: Outbox | None = getattr(request.app.state, "outbox", None)
    if outbox is None:
        return JSONResponse({"error": "STOW-RS intake is off: the DICOM node runs only with OSTEOSCREEN_DICOM_PORT "
                                      "set"}, status_code=404)
    declared = int(request.headers.get("content-length") or 0)
    if declared > MAX_PARTS * MAX_BYTES:
        return JSONResponse({"error": f"request of {declared} bytes is too large"}, status_code=413)
    content_type = request.headers.get("content-type", "")
    try:
        found = parts(await request.body(), content_type)
    except ValueError as exc:
        metrics.DICOM_INTAKE.labels(outcome="refused", reason="stow_rs").inc()
        return JSONResponse({"error": f"STOW-RS: {exc}"}, status_code=400)
    if any(kind.split(";")[0].strip().lower() != "application/dicom" for kind, _ in found):
        metrics.DICOM_INTAKE.labels(outcome="refused", reason="stow_rs").inc()
        return JSONResponse({"error": "STOW-RS: every part must be application/dicom (Part 10 files)"},
                            status_code=415)
    study = request.path_params.get("study")
    outcomes = [await asyncio.to_thread(keep, outbox, data, study) for _, data in found]
    for o in outcomes:
        if o.failure is None:
            metrics.DICOM_INTAKE.labels(outcome="received", reason="stow_rs").inc()
        else:
            metrics.DICOM_INTAKE.labels(outcome="refused", reason="stow_rs").inc()
    return JSONResponse(response_body(outcomes), status_code=_status(outcomes), media_type=DICOM_JSON)

"""A DICOMweb archive as the SOURCE (`dicomweb+http(s)://host/path`): QIDO-RS finds the instances, WADO-RS
retrieves the ones the header checks keep.

The search asks for the model's modalities (CR, DX) in the date range and includes the attributes the header
checks read (body part, view, age), so an excluded instance is never retrieved. Body part and view are checked
here, not sent as QIDO filters: an archive matches a filter exactly, and would drop the many instances that
lack the tag, which the intended use does not exclude. The archive sets the pace: every request, search or
retrieve, goes through a per-process token bucket of `max_requests_per_s / concurrency`, with `concurrency`
retrieving tasks at most, so the job as a whole stays under `max_requests_per_s`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import date

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
PAGE = 500  # QIDO-RS results per request (limit/offset paging)
ATTEMPTS = 3  # a retrieve that fails this many times becomes a failed row
QIDO_FIELDS = ("PatientID", "StudyDate", "Modality", "BodyPartExamined", "ViewPosition", "ViewCodeSequence",
               "PatientAge", "PatientBirthDate", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
TIMEOUT = 60.0


def is_dicomweb(source: str) -> bool:
    return source.startswith(SCHEMES)


class RateLimit:
    """A token bucket: at most `rate` requests per second from this process (None: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self.interval, self.next, self.lock = (1.0 / rate if rate else 0.0), 0.0, threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            delay, self.next = max(0.0, self.next - now), max(now, self.next) + self.interval
        if delay:
            time.sleep(delay)


_limits: dict[float | None, RateLimit] = {}


def limit(rate: float | None) -> RateLimit:
    """This worker process's bucket for `rate` (kept between the tasks the process runs)."""
    return _limits.setdefault(rate, RateLimit(rate))


def search(source: str, modalities: tuple[str, ...], since: date | None, until: date | None,
           rate: float | None = None) -> Iterator[dict]:
    """One input row per instance QIDO-RS finds: its WADO-RS URL as `source` and its attributes (DICOM JSON).

    Series first, then their instances: archives keep body part (a series attribute) at the series level (Orthanc
    answers it there, not for instances), and each instance's attributes are merged over its series'."""
    base = source.removeprefix("dicomweb+").rstrip("/")
    params: dict = {"includefield": ",".join(QIDO_FIELDS)}
    if since or until:
        params["StudyDate"] = f"{since.strftime('%Y%m%d') if since else ''}-{until.strftime('%Y%m%d') if until else ''}"
    for modality in modalities:
        for series in _pages(f"{base}/series", {**params, "Modality": modality}, rate):
            study_uid, series_uid = _value(series, "0020000D"), _value(series, "0020000E")
            url = f"{base}/studies/{study_uid}/series/{series_uid}/instances"
            for instance in _pages(url, params, rate):
                merged = {**series, **instance}
                yield {"source": f"{source.rstrip('/')}/studies/{study_uid}/series/{series_uid}/instances/"
                                 f"{_value(merged, '00080018')}", "qido": json.dumps(merged)}


def _pages(url: str, params: dict, rate: float | None) -> Iterator[dict]:
    import requests

    offset = 0
    while True:
        limit(rate).wait()
        answer = requests.get(url, params={**params, "limit": PAGE, "offset": offset},
                              headers={"Accept": "application/dicom+json"}, timeout=TIMEOUT)
        answer.raise_for_status()
        found = answer.json() if answer.content else []
        yield from found
        if len(found) < PAGE:
            return
        offset += len(found)


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def retrieve(url: str, rate: float | None = None) -> bytes:
    """WADO-RS: the instance's Part 10 bytes. Retried; raises OSError when the archive never gave them."""
    import requests

    target = url.removeprefix("dicomweb+")
    error = "no answer"
    for attempt in range(ATTEMPTS):
        limit(rate).wait()
        try:
            answer = requests.get(target, headers={"Accept": 'multipart/related; type="application/dicom"'},
                                  timeout=TIMEOUT)
            if answer.status_code == 200:
                parts = multipart(answer.content, answer.headers.get("Content-Type", ""))
                if parts:
                    return parts[0]
                error = "an empty answer"
            else:
                error = f"HTTP {answer.status_code}"
                if answer.status_code < 500 and answer.status_code != 429:
                    break
        except requests.RequestException as exc:
            error = type(exc).__name__
        time.sleep(0.5 * 2 ** attempt)
    raise OSError(f"the archive did not deliver the instance ({error})")


def multipart(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a multipart/related body (RFC 2387), without their headers."""
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in content_type.split(";")
                     if p.strip().lower().startswith("boundary=")), None)
    if not boundary:
        return []
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if sep:
            parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    return parts


def metadata(url: str, rate: float | None = None):
    """WADO-RS metadata: the instance's header (DICOM JSON, no pixel data) as a pydicom Dataset, for its SR."""
    import pydicom
    import requests

    limit(rate).wait()
    answer = requests.get(url.removeprefix("dicomweb+") + "/metadata", headers={"Accept": "application/dicom+json"},
                          timeout=TIMEOUT)
    answer.raise_for_status()
    return pydicom.Dataset.from_json(answer.json()[0])

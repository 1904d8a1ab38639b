"""Storing results back to `OSTEOSCREEN_RESULTS_DESTINATION`: C-STORE SCU (pynetdicom) to `dicom://AET@host:port`,
or STOW-RS (dicomweb-client) to a DICOMweb service root `http(s)://host:port/path`.

One association (or one HTTP request) per store: a PACS that restarted between two results costs nothing, and the
node's store-back rate is bounded by screening, not by association set-up. Either way a store either returns
(stored) or raises StoreError, whose message names no input value, and the node retries it with backoff."""

from __future__ import annotations

import io
import logging

from typing import Protocol

import pydicom
import requests
from pydicom import uid
from pynetdicom import AE

from osteoscreen.settings import Destination

log = logging.getLogger("osteoscreen.dicom")

# success, and the warnings that still mean "stored" (coercion, elements discarded, not matching the SOP class)
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class StoreError(Exception):
    """The destination did not store the result: unreachable, association rejected, or a failure status. The
    message names no input value; `kind` (association, status) is what the failure metric counts."""

    def __init__(self, message: str, kind: str = "status") -> None:
        super().__init__(message)
        self.kind = kind


class ResultStore(Protocol):
    def store(self, data: bytes) -> None: ...


def open_destination(destination: Destination, ae_title: str, timeout: float = 30.0) -> ResultStore:
    """The store-back client for a parsed `OSTEOSCREEN_RESULTS_DESTINATION`."""
    if destination.scheme == "dicom":
        return DicomDestination(destination, ae_title, timeout)
    return WebDestination(destination, timeout)


class DicomDestination:
    def __init__(self, destination: Destination, ae_title: str, timeout: float = 30.0) -> None:
        if destination.scheme != "dicom":
            raise ValueError(f"not a DICOM destination: {destination.scheme}")
        self.destination, self.ae_title, self.timeout = destination, ae_title, timeout

    def store(self, data: bytes) -> None:
        """Store one Part 10 instance; returns when the destination answered success. Raises StoreError."""
        ds = pydicom.dcmread(io.BytesIO(data))
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        syntaxes = list(dict.fromkeys([ds.file_meta.TransferSyntaxUID, uid.ExplicitVRLittleEndian,
                                       uid.ImplicitVRLittleEndian]))
        ae.add_requested_context(ds.SOPClassUID, syntaxes)
        d = self.destination
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            raise StoreError("the destination refused or did not answer the association", "association")
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code not in STORED:
            raise StoreError("the destination did not store the result (status "
                             f"{'none' if code is None else f'0x{code:04X}'})")


class WebDestination:
    """STOW-RS to a DICOMweb service root (Orthanc's `/dicom-web`, dcm4chee's `/dcm4chee-arc/aets/AET/rs`, ...).
    The service answers 200 when it kept everything; anything else (202 with a FailedSOPSequence, 409, 5xx, no
    answer) is a failure to retry. The system's CA store verifies an https destination."""

    def __init__(self, destination: Destination, timeout: float = 30.0) -> None:
        from dicomweb_client import DICOMwebClient

        if destination.scheme not in ("http", "https"):
            raise ValueError(f"not a DICOMweb destination: {destination.scheme}")
        self.client = DICOMwebClient(url=destination.url, timeout=timeout)
        self.client.set_http_retry_params(retry=False)  # the outbox retries, with its backoff, across restarts

    def store(self, data: bytes) -> None:
        ds = pydicom.dcmread(io.BytesIO(data))
        try:
            answer = self.client.store_instances(datasets=[ds])
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "none"
            raise StoreError(f"the destination did not store the result (HTTP {code})") from None
        except requests.RequestException as exc:
            raise StoreError(f"the destination did not answer ({type(exc).__name__})", "association") from None
        if answer.get("FailedSOPSequence"):  # 202: answered, but not kept (Orthanc sends an empty one on success)
            reason = answer.FailedSOPSequence[0].get("FailureReason", "none")
            raise StoreError(f"the destination did not store the result (failure reason {reason})")

"""Storing results back: C-STORE SCU (pynetdicom) to `OSTEOSCREEN_RESULTS_DESTINATION=dicom://AET@host:port`.
One association per store: a PACS that restarted between two results costs nothing, and the node's
store-back rate is bounded by screening, not by association set-up."""

from __future__ import annotations

import io
import logging

import pydicom
from pydicom import uid
from pynetdicom import AE

from osteoscreen.settings import Destination

log = logging.getLogger("osteoscreen.dicom")

# success, and the warnings that still mean "stored" (coercion, elements discarded, not matching the SOP class)
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class StoreError(Exception):
    """The destination did not store the result: unreachable, association rejected, or a failure status. The
    message names no input value."""


class DicomDestination:
    def __init__(self, destination: Destination, ae_title: str, timeout: float = 30.0) -> None:
        if destination.scheme != "dicom":
            raise ValueError(f"{destination.scheme} destinations (DICOMweb STOW-RS) are not supported yet")
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
            raise StoreError("the destination refused or did not answer the association")
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code not in STORED:
            raise StoreError("the destination did not store the result (status "
                             f"{'none' if code is None else f'0x{code:04X}'})")

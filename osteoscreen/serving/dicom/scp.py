"""The node's DICOM listener (pynetdicom): Storage SCP for the radiographs the model may screen, and Verification.

C-STORE success is answered only once the instance is committed to the outbox, so a sender whose instance was
not safely kept (a crash, a full disk) hears a failure, or nothing, and sends it again. A calling AE title
outside the allow-list is rejected at association (A-ASSOCIATE-RJ, "calling AE title not recognised").
The handler reads only the request's UIDs; the dataset itself is kept as received, never decoded here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pydicom import uid

from osteoscreen.serving import metrics
from osteoscreen.serving.dicom.outbox import Outbox

log = logging.getLogger("osteoscreen.dicom")

STORAGE = (uid.ComputedRadiographyImageStorage, uid.DigitalXRayImageStorageForPresentation,
           uid.DigitalXRayImageStorageForProcessing, uid.SecondaryCaptureImageStorage)
TRANSFER_SYNTAXES = (uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.JPEGBaseline8Bit,
                     uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEG2000Lossless,
                     uid.JPEG2000, uid.RLELossless)
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700


class Listener:
    """Start with `start(host, port)` (0: any free port; returns the port), stop with `stop()`.
    `on_accept` runs (on the association's thread) after each instance is committed: it wakes the worker."""

    def __init__(self, outbox: Outbox, ae_title: str, allowed_aes: Sequence[str] = (),
                 on_accept: Callable[[], None] = lambda: None) -> None:
        self.outbox, self.on_accept = outbox, on_accept
        self.ae = AE(ae_title=ae_title)
        self.ae.require_calling_aet = list(allowed_aes)  # empty: any calling AE
        for sop_class in STORAGE:
            self.ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        self.ae.add_supported_context(Verification)
        self.ae.maximum_associations = 16
        self._server = None
        self.accepted = 0
        self.refused = 0
        self.rejected = 0
        self._count = threading.Lock()

    def start(self, host: str, port: int) -> int:
        self._server = self.ae.start_server((host, port), block=False,
                                            evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                          (evt.EVT_REJECTED, self._on_rejected)])
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event) -> int:
        request = event.request
        try:
            self.outbox.accept(str(request.AffectedSOPInstanceUID), str(request.AffectedSOPClassUID),
                               event.encoded_dataset())
        except Exception as exc:  # noqa: BLE001 - not kept: the sender must retry; the message may quote a path
            log.warning("C-STORE not accepted: the outbox failed (%s)", type(exc).__name__)
            with self._count:
                self.refused += 1
            metrics.DICOM_INTAKE.labels(outcome="refused", reason="outbox").inc()
            return OUT_OF_RESOURCES
        with self._count:
            self.accepted += 1
        metrics.DICOM_INTAKE.labels(outcome="received", reason="c_store").inc()
        self.on_accept()
        return SUCCESS

    def _on_rejected(self, event) -> None:
        """An association rejected (a calling AE outside the allow-list, or too many associations): counted,
        never logged with the AE title (it may name a site)."""
        with self._count:
            self.rejected += 1
        metrics.DICOM_INTAKE.labels(outcome="rejected", reason="association").inc()

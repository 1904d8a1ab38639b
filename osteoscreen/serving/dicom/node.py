"""The PACS node: the listener, the outbox and the worker that screens what was received and stores the SR back.

The worker runs on the front's event loop, beside HTTP and gRPC, and screens through the one inference path
(`InferencePath.predict([bytes], ["dicom"], dicom=[True])`), so a received image takes the same decode,
intended-use checks and batcher as an API call. For each outbox entry:

  - intended-use header checks first (modality, body part, view, patient age; a missing tag is no failure),
    under either policy: an image failing one is recorded `skipped` with the check's name and never screened
    (the sender already heard success, so it does not send it again);
  - a content-check refusal or an image that does not decode: `failed` (content, invalid_input), no SR;
  - the model busy or not ready: the entry stays `received` and is tried again shortly;
  - otherwise the SR (deterministic UIDs: a re-sent image replaces its result) is held in the outbox and stored
    back; while the destination fails, the entry waits with exponential backoff and is tried again.

After a restart the outbox's pending entries are worked exactly like new ones. Logs name states, counts, check
names and exception types, never an input value or identifier.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

import pydicom

from osteoscreen import settings
from osteoscreen.errors import ImageDecodeError, ModelUnavailableError, OutOfIntendedUseError, OverloadedError
from osteoscreen.intended_use.header import check_dataset
from osteoscreen.intended_use.rules import IntendedUse
from osteoscreen.serving import metrics
from osteoscreen.serving.dicom.outbox import RECEIVED, STATES, Entry, Outbox
from osteoscreen.serving.dicom.scp import Listener
from osteoscreen.serving.dicom.scu import ResultStore, StoreError, open_destination

from osteoscreen.types import Prediction

if TYPE_CHECKING:
    from osteoscreen.serving.explanations import ExplainPath
    from osteoscreen.serving.inference import InferencePath

log = logging.getLogger("osteoscreen.dicom")

HEADER_CHECKS = frozenset({"modality", "body_part", "view", "patient_age"})
BUSY_RETRY_S = 1.0  # an entry the model could not take (busy, not ready) is tried again after this


class DicomNode:
    """`await start(host, port)` on the serving loop (returns the listening port); `await stop()`."""

    def __init__(self, predictor: InferencePath, outbox: Outbox, destination: ResultStore, ae_title: str,
                 allowed_aes: tuple[str, ...] = (), concurrency: int = 8, timeout: float = 120.0,
                 poll_s: float = 1.0, explainer: ExplainPath | None = None) -> None:
        self.predictor, self.outbox, self.destination = predictor, outbox, destination
        self.explainer = explainer  # set: each SR goes with its explanation overlay (OSTEOSCREEN_RESULTS_OVERLAY)
        self.concurrency, self.timeout, self.poll_s = concurrency, timeout, poll_s
        self.listener = Listener(outbox, ae_title, allowed_aes, on_accept=self._wake_threadsafe)
        self.outcomes: Counter[str] = Counter()  # screened, stored, store_retry, skipped:<check>, failed:<reason>
        self._inflight: dict[str, asyncio.Task] = {}
        self._not_before: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self.port: int | None = None

    @classmethod
    def from_settings(cls, predictor: InferencePath, s: settings.Settings | None = None,
                      explainer: ExplainPath | None = None) -> DicomNode:
        """`explainer` is used only with OSTEOSCREEN_RESULTS_OVERLAY set."""
        s = s or settings.current()
        if not s.results_destination:
            raise settings.SettingsError("OSTEOSCREEN_DICOM_PORT is set but OSTEOSCREEN_RESULTS_DESTINATION is not: "
                                         "the node needs somewhere to store its results")
        destination = open_destination(settings.destination(s.results_destination), s.dicom_ae_title)
        return cls(predictor, Outbox.from_settings(s), destination, s.dicom_ae_title, s.allowed_aes,
                   concurrency=s.dicom_concurrency, explainer=explainer if s.results_overlay else None)

    async def start(self, host: str, port: int) -> int:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        # pynetdicom's debug log dumps datasets (patient data): never below WARNING
        logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger("pynetdicom").level))
        pending = len(self.outbox.pending())
        if pending:
            log.warning("DICOM node: %d outbox entries pending from before the start; completing them", pending)
        self.port = await asyncio.to_thread(self.listener.start, host, port)
        self._runner = asyncio.create_task(self._run(), name="dicom-node")
        return self.port

    async def stop(self) -> None:
        await asyncio.to_thread(self.listener.stop)
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, *self._inflight.values(), return_exceptions=True)
        self.outbox.close()

    def _outcome(self, key: str) -> None:
        """Count an intake outcome (`screened`, `skipped:<check>`, `failed:<reason>`), here and in the metric."""
        self.outcomes[key] += 1
        outcome, _, reason = key.partition(":")
        metrics.DICOM_INTAKE.labels(outcome=outcome, reason=reason).inc()

    def _observe_outbox(self) -> None:
        """The outbox gauges: entries by state (0 for an empty state, so a series does not vanish) and the age of
        the oldest unfinished entry."""
        counts = self.outbox.counts()
        for state in STATES:
            metrics.DICOM_OUTBOX.labels(state=state).set(counts.get(state, 0))
        metrics.DICOM_OUTBOX_OLDEST.set(self.outbox.oldest_pending_age())

    def _wake_threadsafe(self) -> None:
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        last_expiry = 0.0
        while True:
            self._wake.clear()
            now = time.time()
            if now - last_expiry > 60:
                await asyncio.to_thread(self.outbox.expire)
                last_expiry = now
            try:
                await asyncio.to_thread(self._observe_outbox)
            except Exception as exc:  # noqa: BLE001 - a metric must not stop the worker
                log.warning("DICOM node: reading the outbox's gauges failed (%s)", type(exc).__name__)
            ready = self.predictor.is_ready()
            for entry in await asyncio.to_thread(self.outbox.due):
                if len(self._inflight) >= self.concurrency:
                    break
                uid = entry.sop_instance_uid
                if uid in self._inflight or self._not_before.get(uid, 0.0) > now or \
                        (entry.state == RECEIVED and not ready):
                    continue
                task = asyncio.create_task(self._work(entry))
                self._inflight[uid] = task
                task.add_done_callback(lambda _, uid=uid: (self._inflight.pop(uid, None), self._wake.set()))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
            except TimeoutError:
                pass

    async def _work(self, entry: Entry) -> None:
        try:
            if entry.state == RECEIVED:
                entry = await self._screen(entry)
                if entry is None:
                    return
            await self._store(entry)
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the worker; logged as its type only
            log.error("DICOM node: working an outbox entry failed (%s); recorded as failed", type(exc).__name__)
            await asyncio.to_thread(self.outbox.failed, entry, "internal")
            self._outcome("failed:internal")

    async def _screen(self, entry: Entry) -> Entry | None:
        """Screen a received entry; the entry, now screened, when there is an SR to store back, else None."""
        data = await asyncio.to_thread(self.outbox.data, entry)
        if data is None:
            return None  # re-sent meanwhile: the new copy is its own entry
        info = self.predictor.info
        check = await asyncio.to_thread(_failed_header_check, data, IntendedUse.from_dict(info and info.intended_use))
        if check:
            return await self._finish(entry, "skipped", check)
        try:
            prediction = await self._predict(data)
        except OutOfIntendedUseError as exc:
            check = exc.findings[0].check if exc.findings else "content"
            return await self._finish(entry, "skipped" if check in HEADER_CHECKS else "failed", check)
        except ImageDecodeError:  # and DicomResultsError: it cannot be decoded, or cannot carry a result
            return await self._finish(entry, "failed", "invalid_input")
        except (OverloadedError, ModelUnavailableError, TimeoutError):
            self._not_before[entry.sop_instance_uid] = time.time() + BUSY_RETRY_S
            return None
        self._not_before.pop(entry.sop_instance_uid, None)
        if prediction.findings:  # the flag policy answered despite a failed check: no SR goes to the PACS
            check = prediction.findings[0].check
            return await self._finish(entry, "skipped" if check in HEADER_CHECKS else "failed", check)
        results = prediction.dicom
        overlay = results.images[0] if results.images else None
        if not await asyncio.to_thread(self.outbox.screened, entry, results.sr, results.sr_sop_instance_uid, overlay):
            return None
        self._outcome("screened")
        return await asyncio.to_thread(self.outbox.get, entry.sop_instance_uid)

    async def _predict(self, data: bytes) -> Prediction:
        """The prediction with its DICOM results: through the batcher, or, with the overlay asked for, through the
        explanation path (the same decode, checks and model; its own concurrency limit)."""
        if self.explainer is not None:
            served = await self.explainer.explain(data, "dicom", timeout=self.timeout, protocol="dicom", dicom=True)
            return served.prediction
        (prediction,) = await self.predictor.predict([data], ["dicom"], timeout=self.timeout, dicom=[True])
        return prediction

    async def _finish(self, entry: Entry, state: str, reason: str) -> None:
        await asyncio.to_thread(self.outbox.skipped if state == "skipped" else self.outbox.failed, entry, reason)
        self._outcome(f"{state}:{reason}")
        log.info("DICOM node: an instance was %s (%s)", state, reason)
        return None

    async def _store(self, entry: Entry) -> None:
        result = await asyncio.to_thread(self.outbox.result, entry)
        if result is None:
            return
        if entry.attempts:
            metrics.DICOM_STORE_RETRIES.inc()
        try:
            for instance in result:  # the overlay first: the SR references it
                await asyncio.to_thread(self.destination.store, instance)
        except Exception as exc:  # noqa: BLE001 - any failure to store is retried; logged without its text
            why = str(exc) if isinstance(exc, StoreError) else type(exc).__name__
            metrics.DICOM_STORE_FAILURES.labels(kind=exc.kind if isinstance(exc, StoreError) else "error").inc()
            delay = await asyncio.to_thread(self.outbox.store_failed, entry)
            self.outcomes["store_retry"] += 1
            log.warning("DICOM node: storing a result back failed (%s); attempt %d, next in %.0f s", why,
                        entry.attempts + 1, delay)
            return
        await asyncio.to_thread(self.outbox.stored, entry)
        self.outcomes["stored"] += 1


def _failed_header_check(data: bytes, rules: IntendedUse) -> str | None:
    """The first intended-use header check the instance fails (None: none fails, or no readable header: the
    inference path then decides)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - the decode path answers unreadable input as invalid_input
        return None
    found = check_dataset(ds, rules)
    return found[0].check if found else None

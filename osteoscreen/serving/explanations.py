"""Explanations, served off the screening path.

An explanation costs a forward pass that keeps the activation maps, TreeSHAP and a PNG: several times a
prediction, and nobody's screening result should wait for it. So explanations never enter the screening
batcher: each front worker admits at most `concurrency` running plus `queue` waiting explanations
(OSTEOSCREEN_EXPLAIN_CONCURRENCY, default 1; OSTEOSCREEN_EXPLAIN_QUEUE, default 2) and refuses the rest at
once (OverloadedError -> HTTP 503 / gRPC RESOURCE_EXHAUSTED); the model service runs them on their own
thread, one at a time, beside the screening one. Bad input fails exactly as on /predict (same decoder).

Intended use: an explanation carries the checks its image failed (DICOM header, and the content score the
model service computes on the same features), as a flagged prediction does. DICOM results (`dicom=True`:
the SR and the overlay as a Secondary Capture, `osteoscreen.dicom_results`) are a result a PACS stores, so
they follow the operator's policy like Predict's: under `refuse` an image outside the intended use gets
OutOfIntendedUseError (header checks before any model time), under `flag` an SR that says so. A non-DICOM
input asking for them is refused before it takes a place in the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from osteoscreen import settings
from osteoscreen.dicom_results import sr
from osteoscreen.errors import ModelUnavailableError, OverloadedError, answer_for
from osteoscreen.explain.attribution import unpack
from osteoscreen.explain.overlay import overlay_rgb, png_of
from osteoscreen.imaging.decode import Decoded, decode, to_model_input
from osteoscreen.intended_use.header import decoded_findings
from osteoscreen.intended_use.policy import Policy, enforce
from osteoscreen.intended_use.rules import IntendedUse
from osteoscreen.serving import metrics
from osteoscreen.results import assemble
from osteoscreen.types import Finding, ModelInfo, Prediction

# The model service's explain call: one model input (224, 224, 1) -> the packed explanation.
ExplainFn = Callable[[np.ndarray], Awaitable[np.ndarray]]


@dataclass(frozen=True)
class ServedExplanation:
    prediction: Prediction
    attribution: np.ndarray  # float32 (224, 224), sums to forest_output - expected_value
    forest_output: float
    expected_value: float
    overlay_png: bytes  # prediction.dicom carries the SR and the overlay as DICOM when they were asked for


class ExplainPath:
    def __init__(self, explain: ExplainFn, model_info: Callable[[], ModelInfo | None],
                 concurrency: int | None = None, queue: int | None = None, policy: Policy | None = None) -> None:
        self._explain = explain
        self._model_info = model_info
        self.policy = policy or Policy.from_env()
        self.concurrency = concurrency or settings.current().explain_concurrency
        self.queue = queue if queue is not None else settings.current().explain_queue
        self.admitted = 0  # running + waiting, in this worker
        self._slots = asyncio.Semaphore(self.concurrency)

    async def explain(self, data: bytes, hint: str | None = None, timeout: float | None = None,
                      protocol: str = "http", dicom: bool = False) -> ServedExplanation:
        """Explain one encoded image; `dicom` also builds its DICOM results (DICOM input only). Raises like
        `Predictor.predict` (ImageDecodeError and its DicomResultsError, OutOfIntendedUseError, OverloadedError,
        ModelUnavailableError, TimeoutError); counts the outcome under `protocol`."""
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await self._admitted(data, hint, timeout, dicom)
            outcome = "ok"
            metrics.EXPLAIN_DURATION.observe(time.perf_counter() - started)
            return result
        except Exception as exc:
            known = answer_for(exc)
            outcome = known.reason if known else "error"  # the error table's reason, as for screening refusals
            raise
        finally:
            metrics.EXPLANATIONS.labels(protocol=protocol, outcome=outcome).inc()

    async def _admitted(self, data: bytes, hint: str | None, timeout: float | None,
                        dicom: bool) -> ServedExplanation:
        info = self._model_info()
        if info is None:
            raise ModelUnavailableError("the model is still loading; retry shortly")
        if dicom:
            sr.require_dicom(data, hint)  # the cheap check, before a place in the queue
        if self.admitted >= self.concurrency + self.queue:
            raise OverloadedError(f"explanations busy: {self.admitted} admitted (limit {self.concurrency} running + "
                                  f"{self.queue} waiting); retry later. Screening (/predict, Predict) is not affected")
        rules = IntendedUse.from_dict(info.intended_use)
        self.admitted += 1
        metrics.EXPLAIN_INFLIGHT.inc()
        try:
            async with asyncio.timeout(timeout):
                decoded, image, found = await asyncio.to_thread(_read, data, hint, rules, dicom)
                if dicom:
                    enforce([found], self.policy)  # refuse on the header before spending model time
                async with self._slots:
                    explanation = unpack(await self._explain(image))
                prediction = assemble(explanation.probability, explanation.content_score, found, info, rules)
                if dicom:
                    enforce([prediction.findings], self.policy)
                rgb = await asyncio.to_thread(overlay_rgb, decoded.pixels, explanation.attribution)
                png = await asyncio.to_thread(png_of, rgb)
                if dicom:
                    results = await asyncio.to_thread(sr.to_results, decoded.header, prediction, sr.Algorithm.of(info),
                                                      overlay_rgb=rgb)
                    prediction = dataclasses.replace(prediction, dicom=results)
        finally:
            self.admitted -= 1
            metrics.EXPLAIN_INFLIGHT.dec()
        return ServedExplanation(prediction, explanation.attribution, explanation.forest_output,
                                 explanation.expected_value, png)


def _read(data: bytes, hint: str | None, rules: IntendedUse,
          dicom: bool) -> tuple[Decoded, np.ndarray, list[Finding]]:
    """The file parsed once, its model input, and what its DICOM header says against the intended use.
    Decoding first: undecodable input is a 400 whatever its header says; then, for DICOM results, the
    identifiers a PACS files them by (a 400 too), all before any model time."""
    decoded = decode(data, hint)
    if dicom:
        sr.check_source(decoded.header)
    return decoded, to_model_input(decoded.pixels), decoded_findings(decoded.header, rules)

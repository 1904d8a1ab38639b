"""The one inference path behind HTTP and both gRPC APIs.

bytes -> decoded, validated 224x224 tensor (here, on the front workers' threads) -> the model service's
`infer`, which batches the requests of every protocol and front worker (`osteoscreen.serving.batching`) and runs
extractor + calibrated RF -> Prediction. Admission is bounded three times: by images waiting (`max_queue`),
by their encoded bytes (`max_inflight_bytes`: one 30 MiB DICOM weighs as much as two hundred phantoms; the
two bound the memory a queue holds), and by time: a request that the images ahead of it would keep past its
deadline is refused at once (OverloadedError -> 503 / RESOURCE_EXHAUSTED) instead of joining a queue it
would time out in. The model's speed comes with its answers, so the estimate follows the hardware and batch
sizes. Decodes run at most one per CPU at once (`decode_threads`), which bounds their memory.

Intended use (`osteoscreen.intended_use`): DICOM header checks run beside decoding, so under `refuse` a chest
film costs no model time; the content check compares the score the model service computes from the same
features as the probability with the cut-off of the model card. Failed checks raise OutOfIntendedUseError
(refuse) or travel in `Prediction.findings` (flag).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from osteoscreen import settings
from osteoscreen.dicom_results import sr
from osteoscreen.serving import metrics
from osteoscreen.errors import ImageDecodeError, ModelUnavailableError, OverloadedError
from osteoscreen.imaging.decode import decode, to_model_input
from osteoscreen.intended_use.header import decoded_findings
from osteoscreen.intended_use.policy import Policy, enforce
from osteoscreen.intended_use.rules import IntendedUse
from osteoscreen.resources import cpu_budget
from osteoscreen.results import assemble, content_band_of
from osteoscreen.types import Finding, InferFn, ModelInfo, Prediction

log = logging.getLogger("osteoscreen.inference")

# refuse when the expected wait exceeds this share of the deadline: on a busy machine the estimate runs
# low (decoding competes with the model for cores), and a queue of half a deadline keeps the model busy
DEADLINE_SHARE = 0.5
SPEED_SMOOTHING = 0.3  # weight of the newest batch in the moving average of seconds per image
# infer answers each image with a row: probability, its batch's compute seconds, its batch's size, and the
# content (out-of-distribution) score of the intended-use check
PROBABILITY, BATCH_SECONDS, BATCH_SIZE, CONTENT_SCORE = range(4)
MiB = 1024 * 1024
# Measured (`python -m loadtest.memory`): decoding a 50 MP 16-bit PNG, the largest image the limits admit, peaks
# at ~366 MiB, a 1955x1841 CR DICOM at ~60 MiB. Decodes run at most one per CPU at once (more threads than
# CPUs only add memory), so the decode peak is bounded by CPUs x 366 MiB.


class InferencePath:
    """Implements `types.Predictor` over a (remote, batched) model call."""

    def __init__(self, infer: InferFn, max_queue: int | None = None, policy: Policy | None = None,
                 max_inflight_bytes: int | None = None, decode_threads: int | None = None):
        self._infer = infer
        self._info: ModelInfo | None = None
        self._rules = IntendedUse()
        self.policy = policy or Policy.from_env()
        # whether the model service answers now: set by the readiness watch, cleared by a failed call too
        self._model_up = False
        self.down_reason = "the model is still loading"
        s = settings.current()
        self.max_queue = max_queue or s.max_queue
        self.max_inflight_bytes = max_inflight_bytes or s.max_inflight_bytes
        self.queued = 0  # images admitted and not yet answered, in this worker
        self.queued_bytes = 0  # their encoded bytes
        self.decode_threads = decode_threads or s.decode_threads or cpu_budget()
        self._decode_slots = asyncio.Semaphore(self.decode_threads)
        self.seconds_per_image: float | None = None  # the model's recent speed; None until its first answer

    def set_model(self, info: ModelInfo) -> None:
        """The model service answered (at start, or again after a crash): serve, and say which model."""
        if not self._model_up and self._info is not None:
            log.warning("the model service answers again: ready")
        self._info = info
        self._rules = IntendedUse.from_dict(info.intended_use)
        self._model_up = True
        metrics.MODEL_INFO.labels(name=info.name, version=info.version, backbone=info.backbone,
                                  precision=info.precision, runtime=info.runtime).set(1)

    def model_down(self, reason: str) -> None:
        """The model service died, hangs or cannot be reached: not ready (probes take the replica out of
        the Service) and new requests are refused at once as retryable, until `set_model` again. Calls
        already sent are left to finish: a model service shutting down after SIGTERM refuses new
        connections but still answers the calls it holds, and the drain depends on those answers."""
        reason = reason.removesuffix("; retry shortly")
        if self._model_up:
            log.warning("model service unavailable, not ready: %s", reason)
        self._model_up = False
        self.down_reason = reason

    def is_ready(self) -> bool:
        return self._info is not None and self._model_up

    @property
    def info(self) -> ModelInfo | None:
        """The served model, once the model service has answered (explanations label their results with it)."""
        return self._info

    @property
    def model_name(self) -> str:
        return self._info.name if self._info else ""

    @property
    def model_version(self) -> str:
        return self._info.version if self._info else ""

    @property
    def backbone(self) -> str:
        return self._info.backbone if self._info else ""

    async def predict(self, images: Sequence[bytes], format_hints: Sequence[str | None] | None = None,
                      timeout: float | None = None, dicom: Sequence[bool] | None = None) -> list[Prediction]:
        info = self._info
        if info is None or not self._model_up:
            raise ModelUnavailableError(f"the model service is not available ({self.down_reason}); retry shortly")
        if not images:
            raise ImageDecodeError("the request holds no image")
        hints = list(format_hints) if format_hints is not None else [None] * len(images)
        if len(hints) != len(images):
            raise ImageDecodeError(f"{len(hints)} format hints for {len(images)} images")
        wants_dicom = list(dicom) if dicom is not None else [False] * len(images)
        for i in (i for i, wanted in enumerate(wants_dicom) if wanted):  # refused before it takes a queue place
            _indexed(len(images), i, sr.require_dicom, images[i], hints[i])
        size = sum(len(image) for image in images)
        self._admit(len(images), size, timeout)
        self.queued += len(images)
        self.queued_bytes += size
        rules = self._rules
        try:
            async with asyncio.timeout(timeout):
                decoded = await self._decode(images, hints)
                dicom_headers = [header for header, _ in decoded]
                headers = [decoded_findings(header, rules) for header in dicom_headers]
                if self.policy is Policy.REFUSE:
                    self._apply(headers)  # refuse before spending model time on it
                batch = np.stack([model_input for _, model_input in decoded])
                if not self._model_up:  # it went down while this request decoded: a call now would wait
                    # on the restarting model's socket until the deadline, instead of being retried elsewhere
                    raise ModelUnavailableError(f"the model service is not available ({self.down_reason}); "
                                                "retry shortly")
                sent = time.perf_counter()
                try:
                    out = np.asarray(await self._infer(batch))
                except ModelUnavailableError as exc:
                    self.model_down(str(exc))  # a real call saw it first: do not wait for the next check
                    raise
        finally:
            self.queued -= len(images)
            self.queued_bytes -= size
        compute, size = float(out[0, BATCH_SECONDS]), float(out[0, BATCH_SIZE])
        metrics.QUEUE_WAIT.observe(max(0.0, time.perf_counter() - sent - compute))
        self._learn(compute / size)
        scores = out[:, CONTENT_SCORE] if out.shape[1] > CONTENT_SCORE else np.full(len(out), np.nan)
        predictions = [assemble(p, score, found, info, rules)
                       for p, score, found in zip(out[:, PROBABILITY].tolist(), scores.tolist(), headers)]
        for p in predictions:
            metrics.CONTENT_CHECK.labels(band=content_band_of(p)).inc()
        self._apply([list(p.findings) for p in predictions])
        for p in predictions:
            metrics.PREDICTIONS.labels(label=p.label).inc()
            metrics.PROBABILITY.observe(p.probability)
        if any(wants_dicom):
            predictions = await self._with_dicom(dicom_headers, predictions, wants_dicom, info)
        return predictions

    @staticmethod
    async def _with_dicom(headers: list[Dataset | None], predictions: list[Prediction], wants: list[bool],
                          info: ModelInfo) -> list[Prediction]:
        """Attach DICOM results (an SR per asking image) from the decoded headers, built on threads:
        pydicom/highdicom are pure Python."""
        algorithm = sr.Algorithm.of(info)

        async def one(i: int) -> Prediction:
            if not wants[i]:
                return predictions[i]
            results = await asyncio.to_thread(_indexed, len(headers), i, sr.to_results, headers[i], predictions[i],
                                              algorithm)
            return dataclasses.replace(predictions[i], dicom=results)

        return list(await asyncio.gather(*(one(i) for i in range(len(headers)))))

    def _apply(self, findings: list[list[Finding]]) -> None:
        """Count the images outside the intended use (by the first check each failed), then apply the policy."""
        action = "refused" if self.policy is Policy.REFUSE else "flagged"
        for found in findings:
            if found:
                metrics.OUT_OF_INTENDED_USE.labels(check=found[0].check, action=action).inc()
        enforce(findings, self.policy)

    def _admit(self, n: int, size: int, timeout: float | None) -> None:
        if self.queued + n > self.max_queue:
            raise OverloadedError(f"server busy: {self.queued} images queued (limit {self.max_queue}); retry later")
        # a lone request larger than the budget still goes (the input limits bound it), never two at once
        if self.queued_bytes and self.queued_bytes + size > self.max_inflight_bytes:
            raise OverloadedError(f"server busy: {self.queued_bytes / MiB:.0f} MiB of images in flight, "
                                  f"{size / MiB:.1f} MiB more would pass the {self.max_inflight_bytes / MiB:.0f} MiB "
                                  "limit; retry later")
        per_image = self.seconds_per_image
        if timeout is None or per_image is None:
            return
        wait = (self.queued + n) * per_image
        if wait <= DEADLINE_SHARE * timeout:
            return
        if n * per_image > DEADLINE_SHARE * timeout:  # not even an idle server could make it
            raise TimeoutError(f"a {timeout:.2f}s deadline is shorter than the model's "
                               f"{n * per_image:.2f}s for {n} images")
        raise OverloadedError(f"server busy: the {self.queued} images queued need about {wait:.1f}s, "
                              f"more than this request's {timeout:.1f}s deadline allows; retry later")

    def _learn(self, sample: float) -> None:
        old = self.seconds_per_image
        self.seconds_per_image = sample if old is None else old + SPEED_SMOOTHING * (sample - old)

    async def _decode(self, images: Sequence[bytes],
                      hints: list[str | None]) -> list[tuple[Dataset | None, np.ndarray]]:
        """Each file parsed once, on a thread: its DICOM header (None for PNG/JPEG) and its model input. The
        full-resolution pixels are dropped here; undecodable input is a 400, whatever its header says."""
        def read(index: int) -> tuple[Dataset | None, np.ndarray]:
            decoded = decode(images[index], hints[index])
            return decoded.header, to_model_input(decoded.pixels)

        async def one(index: int) -> tuple[Dataset | None, np.ndarray]:
            async with self._decode_slots:
                return await asyncio.to_thread(_indexed, len(images), index, read, index)

        return list(await asyncio.gather(*(one(i) for i in range(len(images)))))


def _indexed(count: int, index: int, fn, *args):
    """Call fn; an input error names the image's index when the request holds several."""
    try:
        return fn(*args)
    except ImageDecodeError as exc:
        if count == 1:
            raise
        raise type(exc)(f"image {index}: {exc}") from None

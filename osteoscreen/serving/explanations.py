"""Explanations, served off the screening path.

An explanation costs a forward pass that keeps the activation maps, TreeSHAP and a PNG: several times a
prediction, and nobody's screening result should wait for it. So explanations never enter the screening
batcher: each front worker admits at most `concurrency` running plus `queue` waiting explanations
(OSTEOSCREEN_EXPLAIN_CONCURRENCY, default 1; OSTEOSCREEN_EXPLAIN_QUEUE, default 2) and refuses the rest at
once (OverloadedError -> HTTP 503 / gRPC RESOURCE_EXHAUSTED); the model service runs them on their own
thread, one at a time, beside the screening one. Bad input fails exactly as on /predict (same decoder).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from osteoscreen.errors import ImageDecodeError, ModelUnavailableError, OverloadedError
from osteoscreen.explain.attribution import unpack
from osteoscreen.explain.overlay import overlay_png
from osteoscreen.imaging.decode import decode_image, to_model_input
from osteoscreen.serving import metrics
from osteoscreen.serving.inference import ModelInfo
from osteoscreen.types import LABELS, Prediction

# The model service's explain call: one model input (224, 224, 1) -> the packed explanation.
ExplainFn = Callable[[np.ndarray], Awaitable[np.ndarray]]


@dataclass(frozen=True)
class ServedExplanation:
    prediction: Prediction
    attribution: np.ndarray  # float32 (224, 224), sums to forest_output - expected_value
    forest_output: float
    expected_value: float
    overlay_png: bytes


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    value = int(raw) if raw else default
    if value < 0 or (name.endswith("CONCURRENCY") and value < 1):
        raise ValueError(f"{name} must be a {'positive' if name.endswith('CONCURRENCY') else 'non-negative'} integer")
    return value


class ExplainPath:
    def __init__(self, explain: ExplainFn, model_info: Callable[[], ModelInfo | None],
                 concurrency: int | None = None, queue: int | None = None) -> None:
        self._explain = explain
        self._model_info = model_info
        self.concurrency = concurrency or _env_int("OSTEOSCREEN_EXPLAIN_CONCURRENCY", 1)
        self.queue = queue if queue is not None else _env_int("OSTEOSCREEN_EXPLAIN_QUEUE", 2)
        self.admitted = 0  # running + waiting, in this worker
        self._slots = asyncio.Semaphore(self.concurrency)

    async def explain(self, data: bytes, hint: str | None = None, timeout: float | None = None,
                      protocol: str = "http") -> ServedExplanation:
        """Explain one encoded image. Raises like `Predictor.predict` (ImageDecodeError, OverloadedError,
        ModelUnavailableError, TimeoutError); counts the outcome under `protocol`."""
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await self._admitted(data, hint, timeout)
            outcome = "ok"
            metrics.EXPLAIN_DURATION.observe(time.perf_counter() - started)
            return result
        except ImageDecodeError:
            outcome = "invalid_input"
            raise
        except OverloadedError:
            outcome = "overloaded"
            raise
        except ModelUnavailableError:
            outcome = "unavailable"
            raise
        except TimeoutError:
            outcome = "deadline"
            raise
        finally:
            metrics.EXPLANATIONS.labels(protocol=protocol, outcome=outcome).inc()

    async def _admitted(self, data: bytes, hint: str | None, timeout: float | None) -> ServedExplanation:
        info = self._model_info()
        if info is None:
            raise ModelUnavailableError("the model is still loading; retry shortly")
        if self.admitted >= self.concurrency + self.queue:
            raise OverloadedError(f"explanations busy: {self.admitted} admitted (limit {self.concurrency} running + "
                                  f"{self.queue} waiting); retry later. Screening (/predict, Predict) is not affected")
        self.admitted += 1
        metrics.EXPLAIN_INFLIGHT.inc()
        try:
            async with asyncio.timeout(timeout):
                gray = await asyncio.to_thread(decode_image, data, hint)
                image = await asyncio.to_thread(to_model_input, gray)
                async with self._slots:
                    explanation = unpack(await self._explain(image))
                png = await asyncio.to_thread(overlay_png, gray, explanation.attribution)
        finally:
            self.admitted -= 1
            metrics.EXPLAIN_INFLIGHT.dec()
        label = LABELS[1] if explanation.probability >= info.threshold else LABELS[0]
        prediction = Prediction(explanation.probability, label, info.threshold, info.name, info.version)
        return ServedExplanation(prediction, explanation.attribution, explanation.forest_output,
                                 explanation.expected_value, png)

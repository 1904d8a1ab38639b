"""Greedy batching in front of the model: one model call at a time, carrying everything that waited for it.

Why not only BentoML's adaptive batching: its dispatcher learns how long to hold a batch open from the
waits it observed, and under saturation those waits are the time jobs spent queued behind the busy
model. After a burst it keeps holding lone requests for seconds (measured: C=1 p50 ~2.5 s after a C=32
burst on CPU, against ~0.4 s before it) and forgets only over hundreds of requests. Dispatching as soon
as the model is free (Triton's dynamic batcher with no queue delay) needs no learning: at low load a
request goes alone at once, under load requests pile up while the model works and go as one batch.
Because this front sends one batch at a time, BentoML's dispatcher never sees a busy model, so its own
wait stays at zero; it still merges batches when several front workers share the model service.

The batcher also knows the model's recent cost per image, which admission control needs to refuse at
once a request that could not be answered within its deadline.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

# infer(batch (N, 224, 224, 1) float32) -> (N, 2): [probability, seconds the model spent on the batch]
InferFn = Callable[[np.ndarray], Awaitable[np.ndarray]]


@dataclass
class _Job:
    images: np.ndarray
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GreedyBatcher:
    """`await batcher(images)` -> that request's rows of the model output, batched with its neighbours."""

    def __init__(self, infer: InferFn, max_batch: int = 32, smoothing: float = 0.3):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._infer = infer
        self.max_batch = max_batch
        self._smoothing = smoothing
        self._pending: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.seconds_per_image: float | None = None  # moving average of model time per image; None until measured
        self.calls = 0

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        job = _Job(images)
        self._pending.append(job)
        self._start()
        try:
            return await job.future
        finally:
            job.future.cancel()  # a caller that gave up (deadline) leaves its job behind; the batcher skips it

    def _start(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="osteoscreen-batcher")

    def _take(self) -> list[_Job]:
        """The oldest waiting jobs up to `max_batch` images; always at least one job, however large."""
        jobs: list[_Job] = []
        count = 0
        while self._pending:
            job = self._pending[0]
            if job.future.done():  # its caller gave up
                self._pending.popleft()
                continue
            if jobs and count + len(job.images) > self.max_batch:
                break
            jobs.append(self._pending.popleft())
            count += len(job.images)
        return jobs

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            jobs = self._take()
            if not jobs:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                out = np.asarray(await self._infer(np.concatenate([job.images for job in jobs])))
                if out.ndim != 2 or len(out) != sum(len(job.images) for job in jobs):
                    raise RuntimeError(f"the model answered {out.shape} for {len(jobs)} requests")
            except Exception as exc:  # noqa: BLE001 - the callers of this batch get the model's error
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self._learn(len(out), float(out[0, 1]))
            start = 0
            for job in jobs:
                rows = out[start:start + len(job.images)]
                start += len(job.images)
                if not job.future.done():
                    job.future.set_result(rows)

    def _learn(self, images: int, compute_s: float) -> None:
        self.calls += 1
        sample = compute_s / images
        old = self.seconds_per_image
        self.seconds_per_image = sample if old is None else old + self._smoothing * (sample - old)

    def expected_wait(self, queued_images: int) -> float | None:
        """Seconds until `queued_images` images (the request's own included) are answered, from recent
        model speed; None before the first batch was measured."""
        if self.seconds_per_image is None:
            return None
        return queued_images * self.seconds_per_image

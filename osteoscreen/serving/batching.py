"""Greedy batching inside the model service: one model call at a time, carrying everything that waited for it.

Why not BentoML's adaptive batching: its dispatcher learns how long to hold a batch open from the waits
it observed, and under saturation those waits are the time jobs spent queued behind the busy model.
After a burst it kept holding lone requests for seconds (measured: C=1 p50 ~2.5 s after a C=32 burst on
CPU, against ~0.4 s before it) and forgets only over hundreds of requests. Here a request goes as soon
as the model is free, and requests that arrive while it works go together as the next batch (Triton's
dynamic batcher). The one wait is short and bounded: while fewer images wait than the last batch had,
the batch stays open as long as images keep arriving within one image's model time of each other (they
come faster than the model would process them alone), and never longer than the batch will compute.
Without it, a closed loop of 32 clients alternated batches of 1 and 31 (the first resent request found
the model free and went alone), and a request decoded a moment late waited a whole extra batch.

It lives in the model service, not in the front, so that every admitted request is in flight at the
model service: on SIGTERM the service drains them before it exits, and several front workers share
batches.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from osteoscreen.types import InferFn


@dataclass
class _Job:
    images: np.ndarray
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GreedyBatcher:
    """`await batcher(images)` -> that request's rows of the model output, batched with its neighbours."""

    def __init__(self, infer: InferFn, max_batch: int = 32, max_gather_s: float = 0.5, smoothing: float = 0.3):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._infer = infer
        self.max_batch = max_batch
        self.max_gather_s = max_gather_s
        self._smoothing = smoothing
        self._last_batch = 1
        self._pending: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.seconds_per_image: float | None = None  # moving average of model time per image; None until measured

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        job = _Job(images)
        self._pending.append(job)
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="osteoscreen-batcher")
        try:
            return await job.future
        finally:
            job.future.cancel()  # a caller that gave up (deadline) leaves its job behind; the batcher skips it

    async def _sleep(self, timeout: float | None = None) -> None:
        """Until the next submission, or `timeout` seconds."""
        assert self._wake is not None
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    def _waiting_images(self) -> int:
        return sum(len(job.images) for job in self._pending if not job.future.done())

    async def _gather(self) -> None:
        """Under load, keep the batch open while the requests about to arrive keep coming."""
        gap = self.seconds_per_image
        if gap is None:
            return
        expected = min(self.max_batch, self._last_batch)
        loop = asyncio.get_running_loop()
        until = loop.time() + min(self.max_gather_s, expected * gap)
        while (waiting := self._waiting_images()) < expected and (left := until - loop.time()) > 0:
            await self._sleep(min(left, gap))
            if self._waiting_images() == waiting:  # nothing came within one image's model time
                return

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
        while True:
            if not self._waiting_images():
                self._pending.clear()  # only jobs whose callers gave up
                await self._sleep()
                continue
            await self._gather()
            jobs = self._take()
            if not jobs:
                continue
            started = time.perf_counter()
            try:
                out = np.asarray(await self._infer(np.concatenate([job.images for job in jobs])))
                if len(out) != sum(len(job.images) for job in jobs):
                    raise RuntimeError(f"the model answered {len(out)} rows for {len(jobs)} requests")
            except Exception as exc:  # noqa: BLE001 - the callers of this batch get the model's error
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self._learn(len(out), time.perf_counter() - started)
            start = 0
            for job in jobs:
                rows = out[start:start + len(job.images)]
                start += len(job.images)
                if not job.future.done():
                    job.future.set_result(rows)

    def _learn(self, images: int, seconds: float) -> None:
        self._last_batch = images
        sample = seconds / images
        old = self.seconds_per_image
        self.seconds_per_image = sample if old is None else old + self._smoothing * (sample - old)

"""Closed-loop measurement of a served API: C clients, each sending its next image when the last is answered;
latency percentiles and Little's-law throughput over a window after the warm-up."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loadtest.clients import Call
from loadtest.images import Sample


def percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear) of latencies in seconds, in milliseconds; None for none."""
    return round(float(np.percentile(seconds, q)) * 1e3, 1) if len(seconds) else None


@dataclass
class Record:
    start: float
    end: float
    outcome: str
    protocol: str = ""
    pause: float = 0.0  # the client's back-off after a refusal, part of its cycle but not of the latency

    @property
    def latency(self) -> float:
        return self.end - self.start


REFUSED_BACKOFF_S = 0.05


async def closed_loop(call: Call, samples: Sequence[Sample], concurrency: int, warmup_s: float, duration_s: float,
                      timeout: float = 120.0, seed: int = 0) -> dict:
    """C clients, each sending its next request when the last one is answered. Statistics over the requests
    that complete in [warm-up end, warm-up end + duration]."""
    t0 = time.perf_counter()
    window_start, window_end = t0 + warmup_s, t0 + warmup_s + duration_s
    records: list[Record] = []

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.perf_counter() < window_end:
            sample = rng.choice(samples)
            started = time.perf_counter()
            outcome = await call(sample, timeout)
            ended = time.perf_counter()
            # A refused client backs off before it retries, as a real one does on 503 / RESOURCE_EXHAUSTED:
            # retrying at once turns the refusals into a storm whose own CPU starves the requests being served
            # (HTTP at C=32 over a limit of 16 in flight: 15,000 refusals in 12 s, throughput halved).
            pause = REFUSED_BACKOFF_S if outcome == "rejected" else 0.0
            records.append(Record(started, ended, outcome, pause=pause))
            if pause:
                await asyncio.sleep(pause)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    window = [r for r in records if window_start <= r.end <= window_end]
    ok = [r.latency for r in window if r.outcome == "ok"]
    mean = statistics.fmean(ok) if ok else math.nan
    # Little's law: C clients, each always waiting on one request (or backing off after a refusal), complete
    # C / mean(cycle) requests/s; only the answered share of them counts as throughput.
    rate = concurrency / statistics.fmean(r.latency + r.pause for r in window) * len(ok) / len(window) if ok else 0.0
    return {
        "concurrency": concurrency,
        "requests": len(window),
        "ok": len(ok),
        "outcomes": dict(Counter(r.outcome for r in window)),
        "images_per_s": round(rate, 3),
        "completions_per_s": round(len(ok) / duration_s, 3),
        "p50_ms": percentile_ms(ok, 50),
        "p95_ms": percentile_ms(ok, 95),
        "mean_ms": round(mean * 1e3, 1) if ok else None,
    }

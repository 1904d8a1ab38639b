"""What serving costs outside the model call, in CPU time per image, and what a replica's start-up costs.

At bfloat16 speed the model no longer dominates a 2-core replica: decoding, validation, resizing, the front ->
model-service transfer of float32 224x224 arrays and Python overhead may limit it. This measures that
directly, in CPU seconds (which, unlike wall time, other load on a shared machine barely moves): the CPU time of
every server process (front workers, model service, supervisor) over a fixed number of requests, minus the CPU
the model service spent inside its model calls (`osteoscreen_model_cpu_seconds_total`, measured around each
call). Divided by the images, that is the serving overhead per image; 1000 / it is the ceiling in images/s
one core could feed the model with: the number that says whether one replica could keep a GPU busy.
"""

from __future__ import annotations

import ssl
import time
import urllib.request
from dataclasses import dataclass

from loadtest.clients import Clients
from loadtest.images import Sample

MODEL_SERVICE = "osteoscreen-model"


def scrape(url: str, context: ssl.SSLContext | None = None) -> dict[str, float]:
    """`/metrics` samples as {name{labels}: value}, for the few series read here (`context`: a TLS server's)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30, context=context) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(("osteoscreen_model_cpu_seconds", "osteoscreen_startup_seconds",
                                       "osteoscreen_batch_size_sum", "osteoscreen_batch_size_count")):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def model_cpu_seconds(url: str) -> float:
    return sum(v for k, v in scrape(url).items() if k.startswith("osteoscreen_model_cpu_seconds_total"))


def batches(server) -> tuple[float, float]:
    """(images, model calls) a `ServerProcess` has run so far: the difference over a load level is its mean batch
    size, which says how much of the gap to the raw model's batch-32 speed is smaller batches rather than work
    outside the model."""
    samples = scrape(server.url, server.client_ssl)
    return samples.get("osteoscreen_batch_size_sum", 0.0), samples.get("osteoscreen_batch_size_count", 0.0)


def mean_batch(after: tuple[float, float], before: tuple[float, float]) -> float | None:
    """Images per model call between two `batches()` readings; None when no call ran."""
    calls = after[1] - before[1]
    return round((after[0] - before[0]) / calls, 1) if calls > 0 else None


def startup_phases(url: str) -> dict[str, float]:
    return {k.split("phase=")[1].rstrip("}"): round(v, 2) for k, v in scrape(url).items()
            if k.startswith("osteoscreen_startup_seconds")}


def role(cmdline: list[str]) -> str:
    """Which part of the server a process is: the model service, a front worker, or BentoML's supervisor."""
    text = " ".join(cmdline)
    if "_bentoml_impl.worker.service" not in text:
        return "supervisor"
    return "model" if f"--service-name {MODEL_SERVICE}" in text else "front"


def cpu_by_role(processes) -> dict[str, float]:
    import psutil

    totals = {"front": 0.0, "model": 0.0, "supervisor": 0.0}
    for p in processes:
        try:
            t = p.cpu_times()
            totals[role(p.cmdline())] += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return totals


@dataclass
class Overhead:
    kind: str
    protocol: str
    images: int
    front_ms: float  # front workers' CPU per image: receive, decode, validate, resize, send, answer
    model_service_ms: float  # model service's CPU per image outside the model call: receive arrays, batch, reply
    supervisor_ms: float
    model_call_ms: float  # the model call itself, for scale

    @property
    def outside_ms(self) -> float:
        return self.front_ms + self.model_service_ms + self.supervisor_ms

    def row(self) -> dict:
        return {"input": self.kind, "protocol": self.protocol, "images": self.images,
                "front_cpu_ms": round(self.front_ms, 2), "model_service_outside_call_cpu_ms": round(self.model_service_ms, 2),
                "supervisor_cpu_ms": round(self.supervisor_ms, 2), "outside_model_cpu_ms": round(self.outside_ms, 2),
                "model_call_cpu_ms": round(self.model_call_ms, 2),
                "ceiling_images_per_s_per_core": round(1000 / self.outside_ms, 1) if self.outside_ms > 0 else None}


async def measure_overhead(server, clients: Clients, kind: str, samples: list[Sample], protocol: str, images: int,
                           concurrency: int = 4, timeout: float = 300.0) -> Overhead:
    """CPU per image outside the model call for `images` requests of `samples` over `protocol`."""
    import asyncio

    call = clients.call(protocol)
    procs = server.processes()
    before, model_before = cpu_by_role(procs), model_cpu_seconds(server.url)
    sent = 0
    failures: list[str] = []

    async def client() -> None:
        nonlocal sent
        while sent < images:
            sample = samples[sent % len(samples)]
            sent += 1
            outcome = await call(sample, timeout)
            # A pooled keep-alive connection the server had closed (seen right after a 503 storm) is retried
            # once, as HTTP clients retry such a connection.
            if outcome.startswith("error:Client"):
                outcome = await call(sample, timeout)
            if outcome != "ok":
                failures.append(outcome)

    await asyncio.gather(*(client() for _ in range(min(concurrency, images))))
    time.sleep(0.5)  # let the last metric writes land
    after, model_after = cpu_by_role(procs), model_cpu_seconds(server.url)
    if failures:
        raise RuntimeError(f"{kind} over {protocol}: {len(failures)} of {images} requests failed: {failures[:3]}")
    model_call = model_after - model_before
    per = {r: (after[r] - before[r]) * 1e3 / images for r in after}
    return Overhead(kind, protocol, images, per["front"], per["model"] - model_call * 1e3 / images, per["supervisor"],
                    model_call * 1e3 / images)

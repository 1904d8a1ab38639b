"""`osteoscreen screen SOURCE --out DIR --bench`: images/s through the whole pipeline against the raw model
throughput, both measured in this one run on this machine, and their ratio.

Raw: the bundle's `assess` (extractor + forest + content check) called on ready model inputs of the pipeline's
batch size (`osteoscreen.model.bench`), in a Ray actor of the pipeline's actors' size, before and after the job
(their mean is the yardstick; the two differ when other work shares the machine). In an actor, not in this
process: timed in the driver, the same bundle ran at half the actors' speed on this machine (ratio 2.4, a wrong
yardstick), so raw is measured where the pipeline's model runs, with the same CPUs and thread pools. Pipeline: the job itself (header
stage, reading, decoding, the actor, the Parquet write), at steady state: rows carry the time their batch left
the actor, and the rate is the images after the first batch over the time from the first batch to the last, so
Ray's and the actor's start-up, paid once per job, are left out (docs/screening.md gives them apart).
"""

from __future__ import annotations

import json
import time

import numpy as np

from osteoscreen import settings
from osteoscreen.errors import DataError
from osteoscreen.screening import resume
from osteoscreen.screening.pipeline import Job, ray_session, run
from osteoscreen.screening.schema import SCREENED


class RawModel:
    """The raw yardstick's actor: the bundle loaded as a `Screener` loads it, timed on ready inputs."""

    def __init__(self, tag: str, precision: str | None, cpus: float) -> None:
        from osteoscreen.model import bundle
        from osteoscreen.model.threads import limit_threads
        from osteoscreen.screening.actor import threads_for

        limit_threads(threads_for(cpus))
        self.model = bundle.load(tag, precision=precision)

    def rate(self, batch: int, min_seconds: float) -> dict:
        from osteoscreen.model import bench

        inputs = np.random.default_rng(0).uniform(0, 255, (batch, 224, 224, 1)).astype(np.float32)
        return bench._rate(self.model.assess, inputs, min_seconds)


def _raw_rate(job: Job, tag: str, batch: int, min_seconds: float) -> dict:
    """One raw measurement in a fresh actor, released before the job so that it holds none of the job's CPUs."""
    import ray

    resources = {"num_cpus": job.cpus_per_actor, "num_gpus": job.gpus_per_actor or 0}  # as the job's actors
    actor = ray.remote(**resources)(RawModel).remote(tag, job.precision, job.cpus_per_actor)
    try:
        return ray.get(actor.rate.remote(batch, min_seconds))
    finally:
        ray.kill(actor)


def run_bench(job: Job, min_seconds: float = 10.0) -> str:
    from osteoscreen.model.bundle import card_of

    if resume.result_files(job.out / "results"):
        raise DataError(f"{job.out} holds results already: a benchmark needs a new --out")
    batch = job.batch_size or settings.current().max_batch
    tag, _ = card_of(job.model_tag)  # pinned: raw and the job's actors load the same version
    with ray_session(job) as start:
        start()  # one Ray for raw and the job (run() keeps a Ray its caller started)
        before = _raw_rate(job, tag, batch, min_seconds)
        started = time.perf_counter()
        counts = run(Job(**{**job.__dict__, "model_tag": tag}))
        wall = time.perf_counter() - started
        after = _raw_rate(job, tag, batch, min_seconds)  # before and after: a shared machine's load moves
    return _report(job, tag, batch, counts, wall, before, after)


def _report(job: Job, tag: str, batch: int, counts: dict, wall: float, before: dict, after: dict) -> str:
    raw = (before["images_per_s"] + after["images_per_s"]) / 2
    rows = resume.read_results(job.out / "results").to_pandas()
    screened = rows[rows["status"] == SCREENED].sort_values("time")
    stamps = screened["time"].drop_duplicates()
    if len(stamps) < 2:
        raise DataError("too few batches to measure a steady rate: give more inputs or a smaller --batch-size")
    first_batch = int((screened["time"] == stamps.iloc[0]).sum())
    span = (stamps.iloc[-1] - stamps.iloc[0]).total_seconds()
    pipeline = (len(screened) - first_batch) / span
    return json.dumps({
        "model": tag, "batch": batch, "inputs": counts["total"], "screened": len(screened),
        "raw_images_per_s": round(raw, 2), "raw_before_after": [before["images_per_s"], after["images_per_s"]],
        "pipeline_images_per_s": round(pipeline, 2), "ratio": round(pipeline / raw, 3), "job_wall_s": round(wall, 1),
        "job_images_per_s_including_startup": round(len(screened) / wall, 2)}, indent=2)

"""`osteoscreen screen SOURCE --out DIR --bench`: images/s through the whole pipeline against the raw model
throughput, both measured in this one run on this machine, and their ratio.

Raw: the bundle's `assess` (extractor + forest + content check) called in this process on ready model inputs of
the pipeline's batch size (`osteoscreen.model.bench`), before and after the job (their mean is the yardstick;
the two differ when other work shares the machine). Pipeline: the job itself (header
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
from osteoscreen.screening.pipeline import Job, run
from osteoscreen.screening.schema import SCREENED


def run_bench(job: Job, min_seconds: float = 10.0) -> str:
    from osteoscreen.model import bench, bundle
    from osteoscreen.model.threads import limit_threads
    from osteoscreen.screening.actor import threads_for

    if resume.result_files(job.out / "results"):
        raise DataError(f"{job.out} holds results already: a benchmark needs a new --out")
    batch = job.batch_size or settings.current().max_batch
    limit_threads(threads_for(job.cpus_per_actor))  # the thread pools of one actor: raw is one actor's yardstick
    model = bundle.load(job.model_tag, precision=job.precision)
    inputs = np.random.default_rng(0).uniform(0, 255, (batch, 224, 224, 1)).astype(np.float32)
    before = bench._rate(model.assess, inputs, min_seconds)

    started = time.perf_counter()
    counts = run(Job(**{**job.__dict__, "model_tag": model.tag}))
    wall = time.perf_counter() - started
    after = bench._rate(model.assess, inputs, min_seconds)  # before and after: a shared machine's load moves
    raw = (before["images_per_s"] + after["images_per_s"]) / 2
    tag = model.tag
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

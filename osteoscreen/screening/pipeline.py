"""`osteoscreen screen`: the Ray Data pipeline of `osteoscreen.screening`, from a SOURCE to DIR.

Embedded by default: without `--ray-address` a local Ray starts on this machine. Its logical CPUs are declared
as at least 4 (DESIGN.md): on 2 cores, a 1-CPU model actor next to 1-CPU read and decode tasks otherwise waits
for resources forever, backpressured and silent. With an address (a KubeRay cluster's head, `ray://` or
`auto`), the same pipeline runs there and the actor pool grows to `actors` as the autoscaler adds workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from osteoscreen import settings
from osteoscreen.dicom_results.identity import Algorithm
from osteoscreen.intended_use.rules import IntendedUse
from osteoscreen.screening import dicomweb, metrics, resume, sources, thumbnails, worklist
from osteoscreen.screening.actor import Screener
from osteoscreen.screening.inspect import in_range, inspect
from osteoscreen.screening.prepare import prepare
from osteoscreen.types import ModelInfo

LOCAL_LOGICAL_CPUS = 4  # the least that keeps tasks and one model actor moving on 2 cores (DESIGN.md)
DECODE_CPUS = 0.5
MAX_BLOCKS = 10_000  # a block is the unit of a results file: small enough to lose little to a kill

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    source: str
    out: Path
    model_tag: str | None = None
    results_to: str | None = None  # dicom://AET@host:port or a DICOMweb root http(s)://host/path
    ray_address: str | None = None
    since: date | None = None
    until: date | None = None
    precision: str | None = None
    actors: int = 1  # the actor pool's largest size (it starts at 1)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    batch_size: int | None = None  # default: the serving batcher's largest batch (OSTEOSCREEN_MAX_BATCH)
    max_requests_per_s: float | None = None  # DICOMweb: the archive's limit, for the whole job
    concurrency: int = 4  # DICOMweb: retrieving tasks at most
    metrics_port: int | None = None  # the local Ray's metrics export port (a cluster has its own)


def run(job: Job) -> dict:
    """Screen every input of `job.source` not yet in `job.out`; returns the summary of the whole DIR."""
    from osteoscreen.model.bundle import card_of, is_clinical

    out = prepare_out(job.out)
    tag, card = card_of(job.model_tag)  # pinned: every actor loads this version, whatever `latest` becomes
    rules = IntendedUse.from_dict(card.get("intended_use"))
    done = resume.done_sources(out / "results")
    if dicomweb.is_dicomweb(job.source):
        found = dicomweb.search(job.source, rules.modalities, job.since, job.until, job.max_requests_per_s)
        inputs = [{**row, **dict.fromkeys(sources.CARRIED)} for row in found]
    else:
        inputs = sources.list_inputs(job.source)
    todo = [row for row in inputs if row["source"] not in done]
    with ray_session(job) as start:
        if todo:
            name, _, version = tag.partition(":")
            algorithm = Algorithm.of(ModelInfo(name, version, card["backbone"], float(card["threshold"]),
                                               clinical=is_clinical(card)))
            start()
            metrics.count_inputs(len(todo))
            _screen(job, todo, tag, rules, algorithm, out / "results")
        results = resume.read_results(out / "results")
        wanted = thumbnails.missing(worklist.flagged_images(results), out)  # after a rerun: only the missing ones
        if len(wanted):
            start()
            made = thumbnails.make(wanted, out, tag, actors=job.actors, cpus=job.cpus_per_actor,
                                   gpus=job.gpus_per_actor, rate=_archive_rate(job, askers=job.actors))
            log.info("thumbnails: %d made, failed by kind %s", made["made"], made["failed"])  # kinds, no identifiers
    return worklist.write(results, out)


def prepare_out(out: Path) -> Path:
    """DIR, mode 0700: the results name patients (a referral list must), so only their owner reads them."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    return out


@contextlib.contextmanager
def ray_session(job: Job) -> Iterator:
    """Yields `start()`, which joins Ray (the cluster at --ray-address, else a local one) the first time it is
    called; a Ray this process started is shut down on leaving. A caller that initialised Ray itself keeps it."""
    import ray

    started: list[bool] = []

    def start() -> None:
        if started or ray.is_initialized():
            return
        if job.ray_address:
            ray.init(address=job.ray_address)
        else:
            port = {"_metrics_export_port": job.metrics_port} if job.metrics_port else {}
            ray.init(num_cpus=max(LOCAL_LOGICAL_CPUS, os.cpu_count() or 1), include_dashboard=False,
                     object_store_memory=1 << 30, **port)
        started.append(True)

    try:
        yield start
    finally:
        if started:
            ray.shutdown()


def _archive_rate(job: Job, askers: int) -> float | None:
    """Each of `askers` processes' share of a DICOMweb archive's request limit (None: no archive, or no limit)."""
    if dicomweb.is_dicomweb(job.source) and job.max_requests_per_s:
        return job.max_requests_per_s / askers
    return None


def _screen(job: Job, todo: list[dict], tag: str, rules: IntendedUse, algorithm: Algorithm, results: Path) -> None:
    import ray

    batch = job.batch_size or settings.current().max_batch
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(MAX_BLOCKS, math.ceil(len(todo) / batch))))
    # the archive sets the pace: at most `concurrency` tasks in each of the two stages that ask it (and the
    # store-back's one actor) share its limit, a token bucket each
    archive = dicomweb.is_dicomweb(job.source)
    rate = _archive_rate(job, askers=2 * job.concurrency + (1 if job.results_to else 0))
    bounded = {"concurrency": job.concurrency} if archive else {}
    ds = ds.map(inspect, fn_kwargs={"rules": rules, "rate": rate}, **bounded)
    ds = ds.filter(in_range, fn_kwargs={"since": job.since, "until": job.until})
    # decoding in CPU tasks of their own: a different CPU request than the actor's keeps Ray from fusing
    # them into the actor, where decoding would wait on the model and the model on decoding
    ds = ds.map(prepare, fn_kwargs={"rate": rate}, num_cpus=DECODE_CPUS, **bounded)
    gpus = {"num_gpus": job.gpus_per_actor} if job.gpus_per_actor else {}
    ds = ds.map_batches(Screener, fn_constructor_kwargs={"tag": tag, "precision": job.precision,
                                                         "cpus": job.cpus_per_actor, "last": not job.results_to},
                        batch_size=batch, batch_format="pandas", concurrency=(1, max(1, job.actors)),
                        num_cpus=job.cpus_per_actor, **gpus)
    if job.results_to:
        from osteoscreen.screening.storeback import StoreBack

        ds = ds.map_batches(StoreBack, fn_constructor_kwargs={
            "destination": settings.destination(job.results_to), "ae_title": settings.current().dicom_ae_title,
            "algorithm": algorithm, "rate": rate}, batch_format="pyarrow", concurrency=1,
            num_cpus=0.5)
    ds.write_parquet(str(results))

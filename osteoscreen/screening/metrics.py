"""The job's own metrics, for Prometheus on a cluster: Ray's metrics API (`ray.util.metrics`), recorded in the
actors where the work happens and exported by Ray's metrics agent on every node's metrics export port, the
endpoint KubeRay's PodMonitors scrape. Ray prefixes the names with `ray_` and counters get `_total`:

    ray_osteoscreen_screening_images_total{status, reason}   inputs done, by final status; reason: the
                                                             failed checks (excluded), the stage (failed)
    ray_osteoscreen_screening_model_images_total             images through the model (extractor + forest)
    ray_osteoscreen_screening_model_seconds_total            seconds spent in the model: with the above, an
                                                             actor's throughput and busy share
    ray_osteoscreen_screening_thumbnails_total{outcome}      explanation overlays for the report (ok, failed)
    ray_osteoscreen_screening_inputs_total                   inputs the driver gave the pipeline (after resume)

Rates come from the counters (`rate(..._images_total[5m])`). Labels carry statuses, check names and stage
names only, a small fixed set: never a patient identifier, a header value or an error message (those are in
DIR, mode 0700). A counter counts work done, so a batch Ray retries after a worker died is counted again: the
results table, not the metrics, is exactly once.

Outside a Ray worker (a unit test calling a stage directly) nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from osteoscreen.screening.schema import EXCLUDED, FAILED

PREFIX = "osteoscreen_screening_"
IMAGES, MODEL_IMAGES, MODEL_SECONDS = PREFIX + "images", PREFIX + "model_images", PREFIX + "model_seconds"
THUMBNAILS, INPUTS = PREFIX + "thumbnails", PREFIX + "inputs"

# A failed row's reason is free text (the decoder's message, an HTTP status); its label is the stage that wrote
# it, found by the stages' own fixed wording (inspect.py, prepare.py, dicomweb.py, storeback.py), first match wins.
FAILURE_STAGES = (("store-back:", "store_back"), ("the archive did not give the instance's metadata", "metadata"),
                  ("the archive did not deliver", "retrieve"), ("the DICOM header cannot be read", "header"),
                  ("cannot read the input", "read"))

_made: dict[str, Any] = {}


def _metric(kind: str, name: str, description: str, tags: tuple[str, ...] = ()) -> Any | None:
    """This process's metric object (made once: Ray registers a name per process), or None outside Ray."""
    if name not in _made:
        import ray

        if not ray.is_initialized():
            return None
        from ray.util import metrics

        _made[name] = getattr(metrics, kind)(name, description=description, tag_keys=tags)
    return _made[name]


def reason_label(status: str, reason: str | None) -> str:
    """The `reason` label of a row: the checks of an excluded one, the stage of a failed one, else "none"."""
    if status == EXCLUDED:
        return reason or "unknown"
    if status == FAILED:
        text = reason or ""
        return next((stage for wording, stage in FAILURE_STAGES if wording in text), "decode")
    return "none"


def count_rows(rows: Iterable[tuple[str, str | None]]) -> None:
    """Count finished rows, given as (status, reason) pairs."""
    counter = _metric("Counter", IMAGES, "inputs done, by final status and reason (checks or stage)",
                      ("status", "reason"))
    if counter is None:
        return
    totals: dict[tuple[str, str], int] = {}
    for status, reason in rows:
        key = (status, reason_label(status, reason))
        totals[key] = totals.get(key, 0) + 1
    for (status, label), n in totals.items():
        counter.inc(n, tags={"status": status, "reason": label})


def count_model(images: int, seconds: float) -> None:
    done = _metric("Counter", MODEL_IMAGES, "images through the model (extractor, forest, content check)")
    spent = _metric("Counter", MODEL_SECONDS, "seconds spent in the model")
    if done is not None and images:
        done.inc(images)
        spent.inc(seconds)


def count_thumbnail(ok: bool) -> None:
    counter = _metric("Counter", THUMBNAILS, "explanation overlays made for the report", ("outcome",))
    if counter is not None:
        counter.inc(1, tags={"outcome": "ok" if ok else "failed"})


def count_inputs(n: int) -> None:
    """The driver's count of the inputs it hands the pipeline: progress is images over inputs. A counter, not a
    gauge: Ray's agent drops a gauge's series a few seconds after its last set (measured with 2.60.0), and the
    driver sets this once."""
    counter = _metric("Counter", INPUTS, "inputs given to the pipeline, after the resume took the done ones off")
    if counter is not None and n:
        counter.inc(n)

"""Prometheus series of our own, beside BentoML's built-in `bentoml_service_*` ones.

Created through `bentoml.metrics`, so they live in BentoML's multiprocess registry and every worker's
samples appear on the one `/metrics` endpoint of the HTTP port. The k8s manifests (HPA, alerts, Grafana)
use exactly these names; `tests/test_k8s_policy.py` checks that.
"""

from __future__ import annotations

import bentoml

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PROBABILITY_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

GRPC_REQUESTS = bentoml.metrics.Counter(
    name="osteoscreen_grpc_requests_total",
    documentation="gRPC calls by service, method and status code.",
    labelnames=["service", "method", "code"],
)
REQUEST_DURATION = bentoml.metrics.Histogram(
    name="osteoscreen_request_duration_seconds",
    documentation="Wall time of one prediction request, by protocol (http, grpc) and API.",
    labelnames=["protocol", "api"],
    buckets=LATENCY_BUCKETS,
)
INFLIGHT = bentoml.metrics.Gauge(
    name="osteoscreen_inflight_requests",
    documentation="Prediction requests accepted and not yet answered, by protocol (the HPA's queue-pressure signal).",
    labelnames=["protocol"],
    multiprocess_mode="livesum",
)
QUEUE_WAIT = bentoml.metrics.Histogram(
    name="osteoscreen_queue_wait_seconds",
    documentation="Time from a request's arrival to the start of the model batch that serves it.",
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = bentoml.metrics.Histogram(
    name="osteoscreen_batch_size",
    documentation="Images per model call (extractor + Random Forest).",
    buckets=BATCH_BUCKETS,
)
REJECTED = bentoml.metrics.Counter(
    name="osteoscreen_rejected_requests_total",
    documentation="Requests refused or failed before an answer, by protocol and reason "
                  "(invalid_input, intended_use, overloaded, deadline, unavailable).",
    labelnames=["protocol", "reason"],
)
PREDICTIONS = bentoml.metrics.Counter(
    name="osteoscreen_predictions_total",
    documentation="Predictions returned, by label (for drift of the prediction mix).",
    labelnames=["label"],
)
PROBABILITY = bentoml.metrics.Histogram(
    name="osteoscreen_prediction_probability",
    documentation="Distribution of predicted osteoporosis probability (for drift).",
    buckets=PROBABILITY_BUCKETS,
)
MODEL_INFO = bentoml.metrics.Gauge(
    name="osteoscreen_model_info",
    documentation="Always 1; labels name the model being served and the runtime and compute precision of its "
                  "extractor.",
    labelnames=["name", "version", "backbone", "precision", "runtime"],
    multiprocess_mode="max",
)
MODEL_CPU = bentoml.metrics.Counter(
    name="osteoscreen_model_cpu_seconds_total",
    documentation="CPU seconds the model service's process spent inside model calls (extractor + Random Forest); "
                  "its total CPU minus this is serving overhead (`make bench` reports it per image).",
)
STARTUP = bentoml.metrics.Gauge(
    name="osteoscreen_startup_seconds",
    documentation="Model service start-up by phase (spawn: process start to service init, service imports "
                  "included; import: TensorFlow and Keras; load: bundle load; warmup: first model call, graph "
                  "tracing included; explainer_background: the explanation model's build and warm-up, after ready, off the "
                  "path to it).",
    labelnames=["phase"],
    multiprocess_mode="max",
)
OUT_OF_INTENDED_USE = bentoml.metrics.Counter(
    name="osteoscreen_out_of_intended_use_total",
    documentation="Images outside the model's intended use, by the first check they failed (modality, body_part, "
                  "view, patient_age, content) and what was done (refused, flagged).",
    labelnames=["check", "action"],
)
CONTENT_CHECK = bentoml.metrics.Counter(
    name="osteoscreen_content_check_total",
    documentation="Images the content check scored, by band: typical (answered), unusual (answered with the caution "
                  "'unusual image: check the view and the exposure'), outside (refused, or flagged under the flag "
                  "policy). The intended-use alert counts refusals only, never the unusual band.",
    labelnames=["band"],
)
EXPLANATIONS = bentoml.metrics.Counter(
    name="osteoscreen_explanations_total",
    documentation="Explanation requests by protocol (http, grpc) and outcome (ok, invalid_input, intended_use, "
                  "overloaded, deadline, unavailable, error); counted apart from predictions.",
    labelnames=["protocol", "outcome"],
)
EXPLAIN_DURATION = bentoml.metrics.Histogram(
    name="osteoscreen_explain_duration_seconds",
    documentation="Wall time of one answered explanation request (decode, queue, model, overlay).",
    buckets=LATENCY_BUCKETS,
)
EXPLAIN_INFLIGHT = bentoml.metrics.Gauge(
    name="osteoscreen_explain_inflight",
    documentation="Explanation requests admitted (running or waiting for their own queue) and not yet answered.",
    multiprocess_mode="livesum",
)

# -- the PACS node (osteoscreen.serving.dicom); labels are outcomes, states, check names and error kinds only ------
DICOM_INTAKE = bentoml.metrics.Counter(
    name="osteoscreen_dicom_intake_total",
    documentation="Instances and associations the PACS node handled, by outcome: received (reason = c_store or "
                  "stow_rs: committed to the outbox, answered success); screened; skipped (reason = the intended-use "
                  "header check); failed (reason = content, invalid_input or internal); refused (reason = outbox: "
                  "C-STORE answered Out of Resources; stow_rs: a STOW-RS instance or request answered a failure); "
                  "rejected (reason = association: the calling AE is not allowed).",
    labelnames=["outcome", "reason"],
)
DICOM_OUTBOX = bentoml.metrics.Gauge(
    name="osteoscreen_dicom_outbox_entries",
    documentation="Entries in the PACS node's outbox by state (received, screened, waiting; stored, skipped, failed "
                  "until the retention deletes them); set by the one worker that owns the outbox.",
    labelnames=["state"],
    multiprocess_mode="livemax",
)
DICOM_OUTBOX_OLDEST = bentoml.metrics.Gauge(
    name="osteoscreen_dicom_outbox_oldest_pending_seconds",
    documentation="Seconds the oldest outbox entry not yet finished (received, screened or waiting) has waited; 0 when "
                  "none (the OsteoscreenDicomOutboxStuck alert watches it).",
    multiprocess_mode="livemax",
)
DICOM_STORE_RETRIES = bentoml.metrics.Counter(
    name="osteoscreen_dicom_store_retries_total",
    documentation="Store-back attempts that repeated an earlier failed attempt of the same result.",
)
DICOM_STORE_FAILURES = bentoml.metrics.Counter(
    name="osteoscreen_dicom_store_failures_total",
    documentation="Store-back attempts that failed (each is retried with backoff), by kind: association (refused or "
                  "unreachable), status (the destination answered a failure status), error (anything else).",
    labelnames=["kind"],
)

"""OsteoScreen's bento: two BentoML services, one inference path.

- `Model` holds the registered bundle (grayscale extractor + calibrated Random Forest) and batches the
  requests of every protocol and front worker greedily (`osteoscreen/serving/batching.py` says why not BentoML's
  adaptive batching). It is the only process that imports TensorFlow; give it the GPU.
- `Screening` (the entry point, `bentoml serve service:Screening`) decodes and validates images on CPU
  workers and answers HTTP `POST /predict` (port 3000) and gRPC (port 50051: osteoscreen.v1.Screening,
  the Open Inference Protocol v2, health, reflection). gRPC runs in a `grpc.aio` server started from
  an on-startup hook, because BentoML 1.4 no longer serves gRPC for `@bentoml.service` classes.
- With `OSTEOSCREEN_DICOM_PORT` set, the same hook starts the PACS node (`osteoscreen/serving/dicom/`: the
  C-STORE listener and the outbox worker) over the same inference path, in the one front worker that holds the
  outbox's lock (`osteoscreen/serving/dicom/owner.py` says why a lock and not worker index 0).

Settings are environment variables (`osteoscreen.settings`, the README's table), validated here at import, as
are the TLS files (both ports): a bad value or a bad certificate stops `bentoml serve` with one line before any
worker starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import bentoml
import numpy as np

from osteoscreen import settings
from osteoscreen.errors import OsteoScreenError

try:  # first, before the modules whose import-time limits read the settings
    SETTINGS = settings.current()
except OsteoScreenError as exc:  # one line naming the variable, not a traceback from inside BentoML's import
    print(f"osteoscreen: cannot start: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
if SETTINGS.dicom_port is not None and not SETTINGS.results_destination:
    print("osteoscreen: cannot start: OSTEOSCREEN_DICOM_PORT is set but OSTEOSCREEN_RESULTS_DESTINATION is not (the "
          "node needs somewhere to store its results: dicom://AET@host:port or a DICOMweb http(s):// root)",
          file=sys.stderr)
    raise SystemExit(2)

from osteoscreen.security import dicom_values  # noqa: E402
from osteoscreen.security.tls import TLSSettings  # noqa: E402
from osteoscreen.serving import http, https, metrics  # noqa: E402
from osteoscreen.serving.batching import GreedyBatcher  # noqa: E402
from osteoscreen.serving.explanations import ExplainPath  # noqa: E402
from osteoscreen.serving.inference import InferencePath  # noqa: E402
from osteoscreen.serving.model_client import remote_infer, remote_info  # noqa: E402
from osteoscreen.serving.readiness import ModelWatch  # noqa: E402

log = logging.getLogger("osteoscreen.service")
logging.getLogger("osteoscreen").setLevel(logging.INFO)  # start-up facts (precision chosen, phases) reach the log

dicom_values.withhold_values()  # before any DICOM input is read: pydicom's reports lose the values they quote
try:
    TLS = TLSSettings.from_env()
except OsteoScreenError as exc:
    print(f"osteoscreen: cannot start: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
if TLS is not None:
    https.install(TLS)


# runner_connection: BentoML recycles the front's connection to this service every 100 requests by default and
# fails the requests still in flight on it (BentoML #5540); keep the connection for the process's life.
@bentoml.service(name="osteoscreen-model", workers=1, resources=SETTINGS.accelerator, traffic={"timeout": 120},
                 runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9})
class Model:
    bento_model = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        import psutil

        from osteoscreen.model import bundle
        from osteoscreen.model.threads import limit_threads

        started = time.time()
        import keras  # noqa: F401 - TensorFlow's import, timed on its own: the largest share of start-up

        imported = time.time()
        limit_threads()  # before TensorFlow runs an op: pools sized to the pod's CPU limit, not the node's cores
        self.bundle = bundle.load(str(self.bento_model.tag))  # precision: $OSTEOSCREEN_PRECISION through the gate
        log.info("model %s: extractor %s", self.bundle.tag, self.bundle.precision_reason)
        loaded = time.time()
        if self.bundle.content_check is None:
            log.warning("model %s has no content check (trained before intended-use checks): every image fails "
                        "it; retrain, or serve with OSTEOSCREEN_INTENDED_USE=flag", self.bundle.tag)
        self.bundle.assess(np.zeros((1, 224, 224, 1), np.float32))  # warm-up: trace before traffic
        phases = {"spawn": started - psutil.Process().create_time(), "import": imported - started,
                  "load": loaded - imported, "warmup": time.time() - loaded}
        for phase, seconds in phases.items():
            metrics.STARTUP.labels(phase=phase).set(seconds)
        log.info("model service start-up: %s", ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()))
        # one thread runs every model call: calls never overlap, and TensorFlow keeps one thread's caches
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="osteoscreen-model")
        self.batcher = GreedyBatcher(
            lambda batch: asyncio.get_running_loop().run_in_executor(self._thread, self._compute, batch), SETTINGS.max_batch)
        # explanations: their own Keras model (sharing the weights) on their own thread, one at a time,
        # never in the screening batcher's way. Built and warmed up on that thread after start-up, so a new
        # replica turns ready without waiting for them; the thread runs in order, so an early explanation
        # simply waits for the build.
        self._explain_thread = ThreadPoolExecutor(1, thread_name_prefix="osteoscreen-explain")
        self._explainer = self._explain_thread.submit(self._build_explainer)

    def _build_explainer(self):
        from osteoscreen.model.explainer import Explainer

        started = time.time()
        explainer = Explainer(self.bundle)
        explainer.explain(np.zeros((224, 224, 1), np.float32))  # trace now: the first request is not the slow one
        metrics.STARTUP.labels(phase="explainer_background").set(time.time() - started)
        return explainer

    def _compute(self, images: np.ndarray) -> np.ndarray:
        started, cpu = time.perf_counter(), time.process_time()
        probabilities, content_scores = self.bundle.assess(images)
        metrics.MODEL_CPU.inc(time.process_time() - cpu)
        metrics.BATCH_SIZE.observe(len(images))
        n = len(images)
        return np.stack([probabilities, np.full(n, time.perf_counter() - started), np.full(n, n), content_scores],
                        axis=1)

    @bentoml.api
    async def infer(self, images: np.ndarray) -> np.ndarray:
        """(N, 224, 224, 1) float32 -> (N, 4): probability, its batch's compute seconds and size (the
        front's queue-time metric and deadline-aware admission use them), and the content check's score."""
        return await self.batcher(images)

    @bentoml.api
    async def explain(self, image: np.ndarray) -> np.ndarray:
        """(224, 224, 1) float32 -> (225, 224): the attribution map, then [probability, forest output,
        expected value, content-check score] (`osteoscreen.explain.attribution.pack`)."""
        from osteoscreen.explain.attribution import pack

        loop = asyncio.get_running_loop()
        return pack(await loop.run_in_executor(self._explain_thread, lambda: self._explainer.result().explain(image)))

    @bentoml.api
    def info(self) -> dict:
        return dataclasses.asdict(self.bundle.info)


http_app = http.create_app()


@bentoml.asgi_app(http_app, path="/")
@bentoml.service(
    name="osteoscreen",
    workers=SETTINGS.front_workers,
    # HTTP requests in flight per worker (BentoML answers 503 beyond; /readyz, /metrics bypass it): each holds a
    # body of up to OSTEOSCREEN_MAX_BYTES, so this bounds HTTP's share of memory as the gRPC limits bound gRPC's
    traffic={"timeout": 120, "max_concurrency": SETTINGS.http_max_concurrent * SETTINGS.front_workers},
    http={"port": 3000},
    **({"ssl": https.ssl_config(TLS)} if TLS is not None else {}),
)
class Screening:
    model = bentoml.depends(Model)

    def __init__(self) -> None:
        self.path = InferencePath(remote_infer(lambda batch: self.model.to_async.infer(batch)))
        self.explainer = ExplainPath(remote_infer(lambda image: self.model.to_async.explain(image)),
                                     lambda: self.path.info)
        http_app.state.predictor = self.path
        http_app.state.explainer = self.explainer
        self.grpc = None
        self.dicom = None  # the PACS node's owner, when OSTEOSCREEN_DICOM_PORT is set
        self._watch: asyncio.Task | None = None

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        from osteoscreen.serving.grpc.server import GrpcServer

        self.grpc = GrpcServer(self.path, explainer=self.explainer)
        await self.grpc.start()
        # Ready only while the model service answers: not before it has loaded (probes must not route
        # traffic to a cold replica), and not while it is dead, restarting or hung.
        self._watch = asyncio.get_running_loop().create_task(
            ModelWatch(self.path, remote_info(lambda: self.model.to_async.info())).run())
        if SETTINGS.dicom_port is not None:  # the PACS node, in the one worker holding the outbox lock
            from osteoscreen.serving.dicom.outbox import Outbox
            from osteoscreen.serving.dicom.owner import NodeOwner

            http_app.state.outbox = Outbox.from_settings(SETTINGS)  # STOW-RS intake: every worker takes it
            self.dicom = NodeOwner(self.path, SETTINGS, explainer=self.explainer)
            await self.dicom.start()

    @bentoml.on_shutdown
    async def stop_grpc(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.dicom is not None:  # first: no new C-STORE is accepted while gRPC drains
            await self.dicom.stop()
            http_app.state.outbox.close()
        if self.grpc is not None:
            await self.grpc.stop()

    async def __is_ready__(self) -> bool:
        return self.path.is_ready() and self.grpc is not None and self.grpc.port is not None


if TLS is not None and TLS.allowed is not None:
    Screening.add_asgi_middleware(https.CallerAllowList, allowed=TLS.allowed)

"""Serving benchmark and overload check: what the server delivers compared with the raw model.

    python -m osteoscreen.bench_serving bench     [--duration 15] [--concurrency 1 8 32] [--out reports/bench]
    python -m osteoscreen.bench_serving overload  [--factor 4] [--duration 30] [--deadline 10] [--out reports/bench]
    python -m osteoscreen.bench_serving raw       [--model TAG]   (one raw measurement, JSON on stdout)

`bench` (what `make bench` runs), in one run:

1. *Raw*: the registered model (grayscale extractor + calibrated Random Forest, `osteoscreen.bench.measure`) on
   ready 224x224 tensors at batch 1, 8 and 32, with no server: images/s and the median call time. It runs in
   one separate process, loaded once (`raw --interactive`), which has the same cores and thread settings as
   the server's model process (BentoML sets no thread limits for `@bentoml.service` classes, so TensorFlow
   sees every core in both; nothing is pinned). Fairness on a shared machine: the full raw measurement runs
   while no server process exists (before the server starts and after it stops), and the yardstick of each
   served level is re-measured right before and right after that level's block while the server is idle;
   `ratio_to_raw` divides by the mean of those two, so slow drifts of other load on the machine cancel out
   (`ratio_to_raw_best` divides by the best raw rate of the whole run). On a 2-core machine the front
   worker's decoding shares the cores with the model, which is part of what serving costs.
2. *Served*: a closed loop of C concurrent clients (C = 1, 8, 32) per API (HTTP `POST /predict`, gRPC
   `osteoscreen.v1.Screening/Predict`, Open Inference Protocol v2 `ModelInfer`), each client sending the
   next image as soon as the last one is answered, for `--warmup` + `--duration` seconds; latencies and
   throughput are taken from the requests that complete after the warm-up. Levels run concurrency-major
   (every API at C=1, then at C=8, ...), and a last C=1 level right after the highest concurrency shows how
   long low-load latency stays raised after a burst (BentoML's batcher adapts its hold time to the
   recent batches). Throughput is C / mean latency x the answered share (Little's law, exact for a
   closed loop; the completions-per-second count is reported beside it but is lumpy when one batch of 32
   takes seconds). Inputs: phantom radiographs (PNG and JPEG, the
   same mix for every API), so decoding is cheap and the ratio measures serving, not JPEG 2000 decoding.
3. A markdown table on stdout and `bench_serving.json` / `bench_serving.md` in `--out`, with the ratios
   served/raw and the targets (throughput at C=32 >= 0.85x raw; p50 at C=1 <= 1.25x raw batch-1 call
   + 20 ms). Targets are reported, never asserted: timings on a shared machine are noisy.

`overload`: open-loop (Poisson) arrivals at `--factor` x the measured capacity over every API, each
request with a deadline (gRPC timeout; HTTP client timeout), using the load test's input mix (DICOM
included, the largest inputs). Every request must get an answer within its deadline: a prediction or a fast
refusal (HTTP 503, gRPC RESOURCE_EXHAUSTED / UNAVAILABLE). Reports the outcome counts, refusal latency,
the server's resident memory (all its processes) before/peak/after, and whether it still answers
afterwards; exits 1 when a request missed its deadline or the server did not survive.

Nothing here imports TensorFlow except the `raw` subcommand (run as a subprocess), so the image mix and the
server helper are safe to import from the Locust process (`loadtest/locustfile.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from osteoscreen.types import LABELS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROTOCOLS = ("http", "grpc", "v2")
PROTOCOL_TITLES = {"http": "HTTP /predict", "grpc": "gRPC Screening/Predict", "v2": "gRPC v2 ModelInfer"}
DEFAULT_MIX = "png=6,jpeg=3,dicom=1"
# Real radiographs from pydicom-data: CR chest (RG1, 1955x1841) and tibia (RG3, 1760x1760), uncompressed and
# JPEG 2000. RG1_J2KR takes ~0.8 s to decode on one core here, so DICOM is a small share of the default mix.
DICOM_FILES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm", "RG3_J2KI.dcm")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom"}
REJECTED_HTTP = {503, 429}
REJECTED_GRPC = {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}
MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    format: str  # png | jpeg | dicom

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


@dataclass
class ImageMix:
    """Encoded images by format, and the weights to draw formats with."""

    by_format: dict[str, list[Sample]]
    weights: dict[str, float]
    source: str = ""

    def pick(self, rng: random.Random) -> Sample:
        formats = [f for f in self.weights if self.weights[f] > 0 and self.by_format.get(f)]
        fmt = rng.choices(formats, [self.weights[f] for f in formats])[0]
        return rng.choice(self.by_format[fmt])

    def all(self) -> list[Sample]:
        return [s for f in self.weights if self.weights[f] > 0 for s in self.by_format.get(f, [])]

    def describe(self) -> str:
        parts = [f"{f}: {len(self.by_format.get(f, []))} files x weight {w:g}" for f, w in self.weights.items()]
        return f"{self.source}; " + ", ".join(parts)


def parse_mix(text: str) -> dict[str, float]:
    """"png=6,jpeg=3,dicom=1" -> {"png": 6.0, ...}; unknown formats and bad numbers are errors."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip().lower()
        if name not in CONTENT_TYPES:
            raise ValueError(f"unknown format {name!r} in mix {text!r}; use png, jpeg, dicom")
        try:
            weights[name] = float(value or 1)
        except ValueError:
            raise ValueError(f"bad weight {value!r} for {name} in mix {text!r}") from None
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"mix {text!r} gives no format a positive weight")
    return weights


def _format_of(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if data[128:132] == b"DICM":
        return "dicom"
    return None


def _png_to_jpeg(data: bytes) -> bytes:
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:  # 16-bit phantoms: keep the top 8 bits
        pixels = (pixels.astype(np.uint32) >> 8).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert("L").save(out, "JPEG", quality=90)
    return out.getvalue()


def _real_dicoms(limit_bytes: int) -> list[Sample]:
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return []
    samples = []
    for name in DICOM_FILES:
        try:
            path = get_testdata_file(name)
        except Exception:  # noqa: BLE001 - pydicom-data missing or a file not shipped: use what there is
            path = None
        if path and os.path.getsize(path) <= limit_bytes:
            samples.append(Sample(name, Path(path).read_bytes(), "dicom"))
    return samples


def build_mix(data_dir: str | os.PathLike | None = None, mix: str = DEFAULT_MIX, n_phantoms: int = 8,
              seed: int = 0, max_files: int = 64, max_bytes: int = 16 * MiB) -> ImageMix:
    """The images a load test or benchmark sends.

    With `data_dir`: every PNG/JPEG/DICOM file under it (by content, up to `max_files`). Without: `n_phantoms`
    phantom spine radiographs (`osteoscreen.phantom`, 8- and 16-bit PNG) plus 8-bit JPEG copies of them, and the
    real DICOM radiographs pydicom-data ships. JPEGs are also derived from PNGs when a folder has none."""
    weights = parse_mix(mix)
    by_format: dict[str, list[Sample]] = {f: [] for f in CONTENT_TYPES}
    if data_dir:
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if sum(map(len, by_format.values())) >= max_files:
                break
            if path.stat().st_size > max_bytes:
                continue
            data = path.read_bytes()
            fmt = _format_of(data)
            if fmt:
                by_format[fmt].append(Sample(str(path.relative_to(root)), data, fmt))
        source = f"folder {root}"
    else:
        from osteoscreen.phantom import generate_dataset

        with tempfile.TemporaryDirectory(prefix="osteoscreen-mix-") as tmp:
            os.environ.setdefault("TQDM_DISABLE", "1")
            generate_dataset(Path(tmp) / "set", n_phantoms, seed=seed)
            for path in sorted((Path(tmp) / "set").rglob("*.png")):
                by_format["png"].append(Sample(f"phantom/{path.parent.name}/{path.name}", path.read_bytes(), "png"))
        source = f"{len(by_format['png'])} phantom radiographs (seed {seed})"
    if weights.get("jpeg", 0) > 0 and not by_format["jpeg"]:
        by_format["jpeg"] = [Sample(s.name.rsplit(".", 1)[0] + ".jpg", _png_to_jpeg(s.data), "jpeg")
                             for s in by_format["png"]]
    if weights.get("dicom", 0) > 0 and not by_format["dicom"]:
        by_format["dicom"] = _real_dicoms(max_bytes)
        source += " + pydicom-data radiographs" if by_format["dicom"] else ""
    missing = [f for f, w in weights.items() if w > 0 and not by_format[f]]
    if len(missing) == sum(1 for w in weights.values() if w > 0):
        raise ValueError(f"no images for any format of the mix {mix!r} ({source})")
    return ImageMix(by_format, {f: w for f, w in weights.items() if by_format[f]}, source)


# ---------------------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


class ServerProcess:
    """`bentoml serve service:Screening` as a subprocess group on free loopback ports, for the benchmarks
    and `make loadtest`; `rss_bytes()` sums the resident memory of every process of the server."""

    def __init__(self, http_port: int = 0, grpc_port: int = 0, log_path: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, service: str = "service:Screening",
                 workdir: str | os.PathLike = REPO, **extra_env: str) -> None:
        self.service, self.workdir = service, Path(workdir)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="osteoscreen-server-")) / "server.log"
        self.env = {**(env or os.environ), "OSTEOSCREEN_GRPC_PORT": str(self.grpc_port),
                    "BENTOML_DO_NOT_TRACK": "True", **extra_env}
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(BIN / "bentoml"), "serve", self.service, "--port", str(self.http_port)],
            cwd=self.workdir, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 300.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"server exited with {self.proc and self.proc.returncode}:\n{self.log_tail()}")
            if _http_ok(f"{self.url}/readyz"):
                return self
            time.sleep(1.0)
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def processes(self) -> list:
        import psutil

        if not self.alive():
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        import psutil

        total = 0
        for p in self.processes():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start().wait_ready()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------- clients

# One call: (sample, timeout seconds) -> outcome: "ok", "rejected" (503 / RESOURCE_EXHAUSTED / UNAVAILABLE),
# "deadline" (the client's deadline passed first), or "error:<what>".
Call = Callable[[Sample, float], Awaitable[str]]


class Clients:
    """Async clients for the three APIs over one HTTP session and one gRPC channel."""

    def __init__(self, url: str, grpc_target: str) -> None:
        self.url, self.grpc_target = url, grpc_target
        self._session = None
        self._channel = None

    async def __aenter__(self) -> Clients:
        import aiohttp
        import grpc

        from osteoscreen import codegen

        codegen.ensure_stubs()
        from osteoscreen._generated.inference import grpc_predict_v2_pb2 as v2_pb
        from osteoscreen._generated.inference import grpc_predict_v2_pb2_grpc as v2_grpc
        from osteoscreen._generated.osteoscreen.v1 import screening_pb2 as pb
        from osteoscreen._generated.osteoscreen.v1 import screening_pb2_grpc as pb_grpc

        self._grpc, self._pb, self._v2_pb = grpc, pb, v2_pb
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))
        options = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
        self._channel = grpc.aio.insecure_channel(self.grpc_target, options=options)
        self._screening = pb_grpc.ScreeningStub(self._channel)
        self._v2 = v2_grpc.GRPCInferenceServiceStub(self._channel)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._session.close()
        await self._channel.close()

    def call(self, protocol: str) -> Call:
        return {"http": self.http, "grpc": self.grpc, "v2": self.v2}[protocol]

    async def http(self, sample: Sample, timeout: float) -> str:
        import aiohttp

        try:
            async with self._session.post(
                f"{self.url}/predict", data=sample.data,
                headers={"Content-Type": sample.content_type, "X-Request-Timeout": f"{timeout:g}"},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                body = await response.read()
                if response.status == 200:
                    answer = json.loads(body)
                    return "ok" if answer.get("label") in LABELS else "error:bad-answer"
                if response.status in REJECTED_HTTP:
                    return "rejected"
                if response.status == 504:
                    return "deadline"
                return f"error:http-{response.status}"
        except asyncio.TimeoutError:
            return "deadline"
        except aiohttp.ClientError as exc:
            return f"error:{type(exc).__name__}"

    async def _grpc_outcome(self, coro: Awaitable, check: Callable[[object], bool]) -> str:
        try:
            response = await coro
        except self._grpc.aio.AioRpcError as exc:
            name = exc.code().name
            if name in REJECTED_GRPC:
                return "rejected"
            if name == "DEADLINE_EXCEEDED":
                return "deadline"
            return f"error:{name}"
        return "ok" if check(response) else "error:bad-answer"

    async def grpc(self, sample: Sample, timeout: float) -> str:
        request = self._pb.PredictRequest(image=sample.data, format=sample.format)
        return await self._grpc_outcome(self._screening.Predict(request, timeout=timeout),
                                        lambda r: r.label in LABELS)

    async def v2(self, sample: Sample, timeout: float) -> str:
        from osteoscreen.grpc_v2 import encode_raw_bytes  # grpc + numpy only

        request = self._v2_pb.ModelInferRequest(model_name="osteoporosis")
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(encode_raw_bytes([sample.data]))
        return await self._grpc_outcome(self._v2.ModelInfer(request, timeout=timeout),
                                        lambda r: len(r.outputs) == 2)


# ---------------------------------------------------------------------------------------------- measurement


def percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear) of latencies in seconds, in milliseconds; None for none."""
    return round(float(np.percentile(seconds, q)) * 1e3, 1) if len(seconds) else None


@dataclass
class Record:
    start: float
    end: float
    outcome: str
    protocol: str = ""

    @property
    def latency(self) -> float:
        return self.end - self.start


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
            records.append(Record(started, time.perf_counter(), outcome))

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    window = [r for r in records if window_start <= r.end <= window_end]
    ok = [r.latency for r in window if r.outcome == "ok"]
    mean = statistics.fmean(ok) if ok else math.nan
    # Little's law: C clients, each always waiting on one request, complete C / mean(latency) requests/s;
    # only the answered share of them counts as throughput.
    rate = concurrency / statistics.fmean(r.latency for r in window) * len(ok) / len(window) if ok else 0.0
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


class RawWorker:
    """The raw model in its own process (`python -m osteoscreen.bench_serving raw --interactive`), loaded once
    and measured on demand, so the yardstick can be re-measured right next to each served level."""

    def __init__(self, model_tag: str | None, env: dict | None = None, log_path: str | os.PathLike | None = None):
        self.cmd = [sys.executable, "-m", "osteoscreen.bench_serving", "raw", "--interactive"]
        if model_tag:
            self.cmd += ["--model", model_tag]
        self.env = env or os.environ.copy()
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="osteoscreen-raw-")) / "raw.log"
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def _read(self) -> object:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"raw benchmark process ended:\n{self.log_path.read_text()[-3000:]}")
            if line.lstrip().startswith(("{", "[")):
                return json.loads(line)

    def start(self) -> RawWorker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True)
        self.info = self._read()
        return self

    def measure(self, batch_sizes: Sequence[int], min_seconds: float) -> list[dict]:
        self.proc.stdin.write(json.dumps({"batch_sizes": list(batch_sizes), "min_seconds": min_seconds}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()


def _raw_main(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from osteoscreen import bundle
    from osteoscreen.bench import measure

    model = bundle.load(args.model)
    info = {"model": str(model.tag), "pid": os.getpid(), "cpu_count": os.cpu_count(),
            "cpus_allowed": len(os.sched_getaffinity(0))}
    if not args.interactive:
        results = measure(model.probabilities, tuple(args.batch_sizes), min_seconds=args.min_seconds)
        print(json.dumps({**info, "results": results}), flush=True)
        return 0
    print(json.dumps(info), flush=True)
    for line in sys.stdin:  # one JSON request per line: {"batch_sizes": [...], "min_seconds": s}
        if line.strip():
            request = json.loads(line)
            results = measure(model.probabilities, tuple(request["batch_sizes"]), min_seconds=request["min_seconds"])
            print(json.dumps(results), flush=True)
    return 0


def _rate_at(results: list[dict], batch: int) -> dict | None:
    return next((r for r in results if r["batch"] == batch), None)


def _fmt(value: object, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def bench_report(result: dict) -> str:
    raw = result["raw"]
    lines = [f"## OsteoScreen serving benchmark ({result['machine']})", "",
             f"Model `{result['model']}`; inputs: {result['inputs']}.", "",
             "| path | concurrency / batch | images/s | p50 ms | p95 ms | x raw adjacent | x raw best | requests (ok) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in raw["full"]:
        for row in run["results"]:
            lines.append(f"| raw model, {run['when']} | batch {row['batch']} | {row['images_per_s']:.2f} | "
                         f"{row['median_call_ms']:.0f} (call) | - | - | {row['images_per_s'] / raw['best_images_per_s']:.2f} | "
                         f"{row['calls']} calls |")
    for row in result["served"]:
        level = f"{row['concurrency']} ({row['note']})" if row.get("note") else row["concurrency"]
        lines.append(f"| {PROTOCOL_TITLES[row['protocol']]} | {level} | {row['images_per_s']:.2f} | "
                     f"{_fmt(row['p50_ms'], '.0f')} | {_fmt(row['p95_ms'], '.0f')} | {row['ratio_to_raw']:.2f} "
                     f"(raw {row['raw_adjacent_images_per_s']:.2f}) | {row['ratio_to_raw_best']:.2f} | "
                     f"{row['requests']} ({row['ok']}) |")
    lines += ["", "| target | protocol | measured | goal | met |", "| --- | --- | --- | --- | --- |"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['protocol']} | {_fmt(t['measured'], '.3g')} | {t['goal']} | "
                     f"{'yes' if t['met'] else 'no'} |")
    lines += ["", f"Raw yardstick next to each block (server idle; batch 1 / batch {raw['best_batch']} images/s): "
              + "; ".join(f"{cp['when']}: " + " / ".join(f"{r['images_per_s']:.2f}" for r in cp["results"])
                          for cp in raw["checkpoints"])]
    return "\n".join(lines)


def _targets(served: list[dict], max_concurrency: int) -> list[dict]:
    out = []
    for protocol in sorted({r["protocol"] for r in served}):
        rows = {r["concurrency"]: r for r in served if r["protocol"] == protocol and not r.get("note")}
        top = rows.get(max_concurrency)
        if top:
            ratio = top["ratio_to_raw"]
            out.append({"target": f"throughput at C={max_concurrency} / raw (adjacent)", "protocol": protocol,
                        "measured": ratio, "goal": ">= 0.85 (goal 0.95)", "met": ratio >= 0.85})
        one = rows.get(1)
        if one and one["p50_ms"] is not None:
            limit = 1.25 * one["raw_adjacent_batch1_ms"] + 20
            out.append({"target": "p50 at C=1, ms", "protocol": protocol, "measured": one["p50_ms"],
                        "goal": f"<= {limit:.0f} (1.25 x raw batch-1 {one['raw_adjacent_batch1_ms']:.0f} + 20)",
                        "met": one["p50_ms"] <= limit})
    return out


def _machine() -> str:
    return f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable"


def run_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mix = build_mix(args.data, args.mix, seed=args.seed)
    samples = mix.all()
    print(f"inputs: {mix.describe()}", file=sys.stderr)
    env = os.environ.copy()
    levels = [(c, p, "") for c in args.concurrency for p in args.protocols]
    if args.after_burst and 1 in args.concurrency and max(args.concurrency) > 1:
        levels.append((1, args.protocols[0], f"after C={max(args.concurrency)}"))
    blocks: list[list[tuple[int, str, str]]] = []
    for level in levels:  # one block per concurrency (and one for the after-burst level)
        if blocks and (blocks[-1][0][0], blocks[-1][0][2]) == (level[0], level[2]):
            blocks[-1].append(level)
        else:
            blocks.append([level])

    worker = RawWorker(args.model, env, log_path=out / "raw.log")
    server = ServerProcess(log_path=out / "server.log", env=env, service=args.service, workdir=args.service_dir,
                           **({"OSTEOSCREEN_MODEL_TAG": args.model} if args.model else {}))
    full: list[dict] = []
    checkpoints: list[dict] = []
    served: list[dict] = []
    try:
        worker.start()
        print("raw model, no server running ...", file=sys.stderr)
        full.append({"when": "before the server started", "results": worker.measure(args.batch_sizes, args.raw_seconds)})
        best_batch = max(full[0]["results"], key=lambda r: r["images_per_s"])["batch"]
        check_sizes = sorted({1, best_batch})

        def checkpoint(label: str) -> None:
            results = worker.measure(check_sizes, args.raw_seconds)
            checkpoints.append({"when": label, "results": results})
            print(f"  raw ({label}, server idle): " + ", ".join(
                f"batch {r['batch']} {r['images_per_s']:.2f} img/s" for r in results), file=sys.stderr)

        server.start().wait_ready(args.ready_timeout)
        print(f"server ready: {server.url}, gRPC {server.grpc_target}", file=sys.stderr)

        async def serve_all() -> None:
            async with Clients(server.url, server.grpc_target) as clients:
                for sample in samples[:2]:  # first requests (connection set-up, first batch) are not measured
                    for protocol in args.protocols:
                        await clients.call(protocol)(sample, 120.0)
                # Concurrency-major order: every API sees the server in the same state at each level (BentoML's
                # batcher adapts its hold time to recent batches, so a level run after a burst is slower).
                for block in blocks:
                    checkpoint(f"before C={block[0][0]}{' ' + block[0][2] if block[0][2] else ''}")
                    for c, protocol, note in block:
                        row = await closed_loop(clients.call(protocol), samples, c, args.warmup, args.duration,
                                                seed=args.seed)
                        row.update(protocol=protocol, note=note, checkpoint=len(checkpoints) - 1)
                        served.append(row)
                        print(f"  {protocol:5} C={c:3}{' ' + note if note else ''}: {row['images_per_s']:.2f} img/s, "
                              f"p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms, outcomes {row['outcomes']}",
                              file=sys.stderr)
                checkpoint("after the last level")

        asyncio.run(serve_all())
        server.stop()
        if args.raw_after:
            print("raw model, server stopped ...", file=sys.stderr)
            full.append({"when": "after the server stopped", "results": worker.measure(args.batch_sizes, args.raw_seconds)})
    finally:
        server.stop()
        worker.stop()

    best = max(r["images_per_s"] for run in full for r in run["results"])
    for row in served:
        # the yardstick next to this level: the raw model just before and just after its block, server idle
        around = [checkpoints[row["checkpoint"]], checkpoints[row["checkpoint"] + 1]]
        local = statistics.fmean(_rate_at(cp["results"], best_batch)["images_per_s"] for cp in around)
        local_b1 = statistics.fmean(_rate_at(cp["results"], 1)["median_call_ms"] for cp in around)
        row.update(raw_adjacent_images_per_s=round(local, 3), raw_adjacent_batch1_ms=round(local_b1, 1),
                   ratio_to_raw=round(row["images_per_s"] / local, 3), ratio_to_raw_best=round(row["images_per_s"] / best, 3))
    result = {"machine": _machine(), "model": worker.info.get("model"), "inputs": mix.describe(),
              "raw": {"full": full, "checkpoints": checkpoints, "best_images_per_s": best, "best_batch": best_batch},
              "served": served, "targets": _targets(served, max(args.concurrency)),
              "settings": {"warmup_s": args.warmup, "duration_s": args.duration, "concurrency": args.concurrency,
                           "raw_seconds": args.raw_seconds, "service": args.service,
                           "fairness": "raw = the registered bundle on ready 224x224 tensors in one separate process "
                                       "(same cores, same default thread settings as the model service); measured "
                                       "with no server process (before start, after stop) and, as the yardstick of "
                                       "each level, right before and after that level's block while the server "
                                       "is idle; ratio_to_raw uses the mean of those two, ratio_to_raw_best the "
                                       "best raw rate of the whole run"}}
    (out / "bench_serving.json").write_text(json.dumps(result, indent=2))
    report = bench_report(result)
    (out / "bench_serving.md").write_text(report + "\n")
    print(report)
    print(f"\nwrote {out / 'bench_serving.json'} and {out / 'bench_serving.md'}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- overload


async def open_loop(clients: Clients, protocols: Sequence[str], mix: ImageMix, rate: float, duration_s: float,
                    deadline_s: float, seed: int = 0, max_outstanding: int = 5000) -> list[Record]:
    """Poisson arrivals at `rate`/s for `duration_s`, round-robin over the protocols, whatever the answers."""
    rng = random.Random(seed)
    records: list[Record] = []
    tasks: set[asyncio.Task] = set()
    skipped = 0

    async def one(protocol: str, sample: Sample) -> None:
        started = time.perf_counter()
        outcome = await clients.call(protocol)(sample, deadline_s)
        records.append(Record(started, time.perf_counter(), outcome, protocol))

    t0 = time.perf_counter()
    next_at, i = t0, 0
    while next_at < t0 + duration_s:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) < max_outstanding:
            task = asyncio.create_task(one(protocols[i % len(protocols)], mix.pick(rng)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        else:
            skipped += 1
        i += 1
        next_at += rng.expovariate(rate)
    if tasks:
        await asyncio.gather(*tasks)
    if skipped:
        print(f"warning: the client skipped {skipped} arrivals (more than {max_outstanding} outstanding)",
              file=sys.stderr)
    return records


def summarize_overload(records: list[Record], deadline_s: float, fast_s: float) -> dict:
    by_outcome = Counter(r.outcome for r in records)
    rejected = [r.latency for r in records if r.outcome == "rejected"]
    ok = [r.latency for r in records if r.outcome == "ok"]
    late = [r for r in records if r.latency > deadline_s + 0.25 or r.outcome == "deadline"]
    per_protocol = {}
    for p in sorted({r.protocol for r in records}):
        rs = [r for r in records if r.protocol == p]
        per_protocol[p] = dict(Counter(r.outcome for r in rs))

    return {
        "requests": len(records),
        "outcomes": dict(by_outcome),
        "per_protocol": per_protocol,
        "answered_within_deadline": len(records) - len(late),
        "missed_deadline": len(late),
        "errors": sum(n for o, n in by_outcome.items() if o.startswith("error")),
        "ok_p50_ms": percentile_ms(ok, 50), "ok_p95_ms": percentile_ms(ok, 95), "ok_max_ms": percentile_ms(ok, 100),
        "rejected_p50_ms": percentile_ms(rejected, 50), "rejected_p95_ms": percentile_ms(rejected, 95),
        "rejected_max_ms": percentile_ms(rejected, 100),
        "rejections_fast": all(x <= fast_s for x in rejected),
    }


def run_overload(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mix = build_mix(args.data, args.mix, seed=args.seed)
    print(f"inputs: {mix.describe()}", file=sys.stderr)
    extra = {"OSTEOSCREEN_MODEL_TAG": args.model} if args.model else {}
    server = ServerProcess(log_path=out / "overload-server.log", service=args.service, workdir=args.service_dir,
                           **extra)
    memory: list[tuple[float, int]] = []
    result: dict = {"machine": _machine(), "inputs": mix.describe(), "deadline_s": args.deadline,
                    "protocols": list(args.protocols), "factor": args.factor, "duration_s": args.duration,
                    "server_env": {k: v for k, v in os.environ.items() if k.startswith("OSTEOSCREEN_")}}
    try:
        server.start().wait_ready(args.ready_timeout)

        async def sample_memory(stop: asyncio.Event) -> None:
            t0 = time.perf_counter()
            while not stop.is_set():
                memory.append((round(time.perf_counter() - t0, 2), server.rss_bytes()))
                try:
                    await asyncio.wait_for(stop.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass

        async def main() -> None:
            async with Clients(server.url, server.grpc_target) as clients:
                warm = mix.all()[0]
                for p in args.protocols:
                    await clients.call(p)(warm, 120.0)
                capacity = args.capacity
                if not capacity:
                    weighted = [mix.pick(random.Random(i)) for i in range(256)]  # the mix's format weights
                    row = await closed_loop(clients.call("grpc"), weighted, 32, 5.0, args.capacity_seconds)
                    capacity = row["images_per_s"]
                    result["capacity_measurement"] = row
                result["capacity_images_per_s"] = capacity
                result["offered_rate_per_s"] = rate = args.factor * capacity
                await asyncio.sleep(2.0)
                result["rss_before_mb"] = round(server.rss_bytes() / MiB, 1)
                print(f"capacity {capacity:.2f} img/s; offering {rate:.1f} req/s for {args.duration:.0f}s, "
                      f"deadline {args.deadline:.1f}s", file=sys.stderr)
                stop = asyncio.Event()
                sampler = asyncio.create_task(sample_memory(stop))
                records = await open_loop(clients, args.protocols, mix, rate, args.duration, args.deadline,
                                          seed=args.seed)
                await asyncio.sleep(2.0)
                stop.set()
                await sampler
                result.update(summarize_overload(records, args.deadline, args.fast))
                result["server_alive_after"] = server.alive() and _http_ok(f"{server.url}/livez")
                result["prediction_after"] = await clients.call("grpc")(warm, 60.0)
                result["rss_after_mb"] = round(server.rss_bytes() / MiB, 1)

        asyncio.run(main())
    finally:
        server.stop()
    result["rss_peak_mb"] = round(max((m for _, m in memory), default=0) / MiB, 1)
    result["rss_samples_mb"] = [(t, round(m / MiB, 1)) for t, m in memory]
    result["passed"] = bool(result.get("missed_deadline") == 0 and result.get("errors") == 0
                            and result.get("server_alive_after") and result.get("prediction_after") == "ok")
    (out / "overload.json").write_text(json.dumps(result, indent=2))
    print(overload_report(result))
    print(f"\nwrote {out / 'overload.json'}", file=sys.stderr)
    return 0 if result["passed"] else 1


def overload_report(r: dict) -> str:
    return "\n".join([
        f"## OsteoScreen overload ({r['machine']})", "",
        f"Offered {r['offered_rate_per_s']:.1f} req/s = {r['factor']:g} x capacity ({r['capacity_images_per_s']:.2f} "
        f"img/s) for {r['duration_s']:.0f} s over {', '.join(r['protocols'])}; deadline {r['deadline_s']:g} s.", "",
        "| measure | value |", "| --- | --- |",
        f"| requests | {r['requests']} |",
        f"| outcomes | {r['outcomes']} |",
        f"| per protocol | {r['per_protocol']} |",
        f"| answered within deadline | {r['answered_within_deadline']} / {r['requests']} |",
        f"| ok latency p50 / p95 / max, ms | {r['ok_p50_ms']} / {r['ok_p95_ms']} / {r['ok_max_ms']} |",
        f"| refusal latency p50 / p95 / max, ms | {r['rejected_p50_ms']} / {r['rejected_p95_ms']} / "
        f"{r['rejected_max_ms']} |",
        f"| server RSS before / peak / after, MB | {r['rss_before_mb']} / {r['rss_peak_mb']} / {r['rss_after_mb']} |",
        f"| server alive after, next prediction | {r['server_alive_after']}, {r['prediction_after']} |",
        f"| passed | {r['passed']} |",
    ])


# ---------------------------------------------------------------------------------------------- CLI


def _protocols(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PROTOCOLS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"protocols are a comma list of {', '.join(PROTOCOLS)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m osteoscreen.bench_serving", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, mix: str) -> None:
        p.add_argument("--model", default=os.environ.get("OSTEOSCREEN_MODEL_TAG"), help="model tag (default: latest)")
        p.add_argument("--data", default=os.environ.get("OSTEOSCREEN_LOADTEST_DATA"),
                       help="folder of PNG/JPEG/DICOM files to send (default: phantoms + pydicom-data)")
        p.add_argument("--mix", default=mix, help=f"format weights (default {mix})")
        p.add_argument("--protocols", type=_protocols, default=list(PROTOCOLS))
        p.add_argument("--out", default="reports/bench")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--ready-timeout", type=float, default=600.0)
        p.add_argument("--service", default="service:Screening", help="what `bentoml serve` serves (e.g. a bento tag)")
        p.add_argument("--service-dir", default=str(REPO), help="the folder `bentoml serve` runs in")

    p = sub.add_parser("bench", help="raw model vs served throughput and latency")
    common(p, "png=2,jpeg=1")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--warmup", type=float, default=6.0, help="seconds per level before measuring")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per level")
    p.add_argument("--raw-seconds", type=float, default=4.0, help="minimum seconds per raw batch size")
    p.add_argument("--no-raw-after", dest="raw_after", action="store_false",
                   help="skip the full raw measurement after the server stopped")
    p.add_argument("--no-after-burst", dest="after_burst", action="store_false",
                   help="skip the last level: C=1 on the first API right after the highest concurrency")
    p.set_defaults(func=run_bench)

    p = sub.add_parser("overload", help="offered load well past capacity: answers within deadline, bounded memory")
    common(p, DEFAULT_MIX)
    p.add_argument("--factor", type=float, default=4.0, help="offered load as a multiple of capacity")
    p.add_argument("--capacity", type=float, default=0.0, help="images/s (default: measured first, gRPC C=32)")
    p.add_argument("--capacity-seconds", type=float, default=15.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--deadline", type=float, default=10.0, help="per-request deadline, seconds")
    p.add_argument("--fast", type=float, default=1.0, help="a refusal slower than this (s) is not 'fast'")
    p.set_defaults(func=run_overload)

    p = sub.add_parser("raw", help="(internal) raw model throughput in this process, JSON")
    p.add_argument("--model", default=os.environ.get("OSTEOSCREEN_MODEL_TAG"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--min-seconds", type=float, default=5.0)
    p.add_argument("--interactive", action="store_true",
                   help="load once, then answer JSON requests on stdin ({\"batch_sizes\": [..], \"min_seconds\": s})")
    p.set_defaults(func=_raw_main)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""`bentoml serve service:Screening` as a subprocess group on free loopback ports: what the benchmarks,
`make loadtest` and the test suite start a real server with."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout: float = 2.0, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return response.status == 200
    except OSError:
        return False


class ServerProcess:
    """`bentoml serve service:Screening` as a subprocess group on free loopback ports, for the benchmarks
    and `make loadtest`; `rss_bytes()` sums the resident memory of every process of the server.

    With OSTEOSCREEN_TLS_CERT in its environment the server speaks HTTPS (`url` says so) and TLS on gRPC;
    `client_ssl` is what the readiness check connects with (the CA, and a client certificate under mTLS)."""

    def __init__(self, http_port: int = 0, grpc_port: int = 0, log_path: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, service: str = "service:Screening",
                 workdir: str | os.PathLike = REPO, client_ssl: ssl.SSLContext | None = None, **extra_env: str) -> None:
        self.service, self.workdir = service, Path(workdir)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="osteoscreen-server-")) / "server.log"
        # flag unless told otherwise: load tests and benchmarks send pydicom-data's chest and tibia films to
        # exercise decoding, which the default policy (refuse) would answer with 422 before the model
        self.env = {"OSTEOSCREEN_INTENDED_USE": "flag", **(env or os.environ),
                    "OSTEOSCREEN_GRPC_PORT": str(self.grpc_port), "BENTOML_DO_NOT_TRACK": "True", **extra_env}
        self.tls = bool(self.env.get("OSTEOSCREEN_TLS_CERT"))
        if self.tls:  # a free health port too, so that servers on one machine do not collide
            self.env.setdefault("OSTEOSCREEN_GRPC_HEALTH_PORT", str(free_port()))
        self.client_ssl = client_ssl
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
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
            if http_ok(f"{self.url}/readyz", context=self.client_ssl):
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

    def kill(self, timeout: float = 30.0) -> None:
        """SIGKILL the server and every process under it, as a node failure would, and wait until all are gone."""
        self._kill_all(self.processes(), timeout)
        self.stop()

    @staticmethod
    def _kill_all(tree: list, timeout: float) -> None:
        import psutil

        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=timeout)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (a graceful shutdown), then SIGKILL after `timeout`; either way no process of the server is left.
        BentoML's workers run in sessions of their own, so a signal to the process group alone can leave one
        alive (and holding its ports and locks) after its parent died."""
        if self.proc is None:
            return None
        tree = self.processes()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._kill_all([p for p in tree if p.is_running()], 10.0)
        if self._log:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start().wait_ready()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def machine() -> str:
    """The CPUs a benchmark ran on, for its report."""
    return f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable"

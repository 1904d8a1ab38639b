"""The raw model's throughput, the yardstick served throughput is divided by: the registered bundle on ready
224x224 tensors, in its own process (the only one of the benchmark that imports TensorFlow).

    python -m loadtest.raw [--model TAG] [--precision P] [--batch-sizes 1 8 32] [--min-seconds 5] [--interactive]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class RawWorker:
    """The raw model in its own process (`python -m loadtest.raw --interactive`), loaded once
    and measured on demand, so the yardstick can be re-measured right next to each served level."""

    def __init__(self, model_tag: str | None, env: dict | None = None, log_path: str | os.PathLike | None = None):
        self.cmd = [sys.executable, "-m", "loadtest.raw", "--interactive"]
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


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from osteoscreen.model import bundle
    from osteoscreen.model.bench import measure

    model = bundle.load(args.model, precision=args.precision)  # the server's choice: same setting, same gate
    info = {"model": str(model.tag), "pid": os.getpid(), "cpu_count": os.cpu_count(),
            "cpus_allowed": len(os.sched_getaffinity(0)), "runtime": model.runtime, "precision": model.precision,
            "precision_reason": model.precision_reason}
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.raw", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("OSTEOSCREEN_MODEL_TAG"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--precision", default=None, help="auto|float32|bfloat16 (default: $OSTEOSCREEN_PRECISION, else auto)")
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--interactive", action="store_true",
                        help="load once, then answer JSON requests on stdin ({\"batch_sizes\": [..], \"min_seconds\": s})")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

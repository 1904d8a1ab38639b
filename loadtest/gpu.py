"""The GPU check, a few minutes on a machine with an NVIDIA GPU (`make bench-gpu`): raw model throughput in
float32 and bfloat16, back to back in one process, then a short served benchmark with the model service on
the GPU at `auto` precision; writes `gpu.json` and `gpu.md` (the table for docs/results).

    python -m loadtest.gpu [--model TAG] [--out reports/bench/gpu] [--duration 8]

It refuses to run without a visible GPU (a CPU run would be mislabelled as a GPU result). The bundle must
carry a passing bfloat16 agreement check (trained by this version) for `auto` to serve bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtest.server import BIN, REPO


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def report(result: dict) -> str:
    raw = result["raw"]
    lines = [f"## OsteoScreen on GPU ({', '.join(result['gpus'])})", "",
             f"Model `{raw['model']}`. Raw: extractor + calibrated RF on ready 224x224 tensors, both precisions "
             "back to back in one process.", "",
             "| precision (requested) | batch | images/s | median call ms | x first |", "| --- | --- | --- | --- | --- |"]
    first = raw["by_precision"][0]["results"]
    for run in raw["by_precision"]:
        for row, ref in zip(run["results"], first):
            lines.append(f"| {run['precision']} ({run['requested']}) | {row['batch']} | {row['images_per_s']:.1f} | "
                         f"{row['median_call_ms']:.1f} | {row['images_per_s'] / ref['images_per_s']:.2f} |")
    lines += ["", "Served (model service on the GPU, OSTEOSCREEN_PRECISION=auto):", "",
              Path(result["served_md"]).read_text() if result.get("served_md") else "(not run)"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("OSTEOSCREEN_MODEL_TAG"))
    parser.add_argument("--out", default="reports/bench/gpu")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per served level")
    args = parser.parse_args(argv)
    gpus = gpu_names()
    if not gpus:
        print("no NVIDIA GPU visible (nvidia-smi): nothing to measure here", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = ["--model", args.model] if args.model else []
    raw = subprocess.run([str(BIN / "osteoscreen"), "bench", *model, "--precision", "float32", "bfloat16",
                          "--batch-sizes", "1", "8", "32", "64"], cwd=REPO, capture_output=True, text=True)
    if raw.returncode != 0:
        print(raw.stderr[-3000:], file=sys.stderr)
        return 1
    result = {"gpus": gpus, "raw": json.loads(raw.stdout)}
    env = {**os.environ, "OSTEOSCREEN_GPU": "1", "OSTEOSCREEN_PRECISION": "auto"}
    served = subprocess.run([sys.executable, "-m", "loadtest.bench", "bench", *model, "--duration", str(args.duration),
                             "--warmup", "4", "--raw-seconds", "2", "--concurrency", "1", "32", "--batch-sizes", "1", "32",
                             "--no-raw-after", "--overhead-images", "32", "--out", str(out / "served")],
                            cwd=REPO, env=env, text=True)
    if served.returncode == 0:
        result["served"] = json.loads((out / "served" / "bench_serving.json").read_text())
        result["served_md"] = str(out / "served" / "bench_serving.md")
    (out / "gpu.json").write_text(json.dumps(result, indent=2))
    (out / "gpu.md").write_text(report(result) + "\n")
    print(report(result))
    return served.returncode


if __name__ == "__main__":
    sys.exit(main())

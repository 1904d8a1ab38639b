"""What a DICOM result costs: the time to build the SR (read the source header, build the TID 1500 document with
highdicom, encode it) per image, on pydicom-data's real CR radiographs. No server and no model: the SR is built
after the prediction, on a front worker's thread, so this is the whole of its added latency. `make bench` adds
the numbers to its notes; `python -m loadtest.dicom_sr` prints them alone."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

GOAL_MS = 20.0
SOURCES = ("RG1_J2KR.dcm", "RG3_J2KR.dcm", "RG3_UNCR.dcm")  # MONOCHROME1 chest, tibia (JPEG 2000, uncompressed)


def measure(repeats: int = 30) -> dict:
    from pydicom.data import get_testdata_file

    from osteoscreen.dicom_results import sr
    from osteoscreen.types import Prediction

    paths = [get_testdata_file(name) for name in SOURCES]
    if any(p is None for p in paths):
        return {"note": "pydicom-data is not installed: no real radiographs to build SRs from"}
    sources = [open(p, "rb").read() for p in paths]
    prediction = Prediction(0.5, "osteoporosis", 0.316, "osteoscreen", "bench")
    algorithm = sr.Algorithm("osteoscreen", "bench", "vgg16")
    for data in sources:  # warm-up: imports, highdicom's first-use caches
        sr.to_results(data, prediction, algorithm)
    times, cpu = [], []
    for _ in range(repeats):
        for data in sources:
            started, started_cpu = time.perf_counter(), time.process_time()
            sr.to_results(data, prediction, algorithm)
            times.append((time.perf_counter() - started) * 1000)
            cpu.append((time.process_time() - started_cpu) * 1000)
    times.sort()
    median, p95 = statistics.median(times), times[int(0.95 * (len(times) - 1))]
    # CPU time is what one idle core would take; on a shared machine the wall time is that times the contention
    cpu_median = statistics.median(cpu)
    return {"sources": list(SOURCES), "builds": len(times), "median_ms": round(median, 2), "p95_ms": round(p95, 2),
            "cpu_median_ms": round(cpu_median, 2), "goal_ms": GOAL_MS, "met": cpu_median < GOAL_MS}


def note(result: dict) -> str:
    """One line for `make bench`'s notes."""
    if "median_ms" not in result:
        return f"DICOM SR build: not measured ({result.get('note', 'no data')})."
    return (f"DICOM SR build per image (read the source header, build the TID 1500 SR, encode; "
            f"{', '.join(result['sources'])}; {result['builds']} builds): CPU time median {result['cpu_median_ms']:.1f} ms "
            f"(goal < {result['goal_ms']:.0f} ms: {'met' if result['met'] else 'not met'}); wall time median "
            f"{result['median_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms on this machine's load.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    result = measure(parser.parse_args(argv).repeats)
    print(json.dumps(result))
    print(note(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a DICOM result costs: the time to build the SR (read the source header, build the TID 1500 document with
highdicom, encode it) per image, on pydicom-data's real CR radiographs. No server and no model: the SR is built
after the prediction, on a front worker's thread, so this is the whole of its added latency. `make bench` adds
the numbers to its notes; `python -m loadtest.dicom_sr` prints them alone.

It also times the explanation overlay as a DICOM Secondary Capture (`osteoscreen.dicom_results.sc`, a 512-pixel
RGB overlay at each radiograph's aspect): the SC alone (build + encode), and the SR with the SC it references,
what `Explain` with DICOM results adds after the explanation itself (about a second of model time)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

import numpy as np

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
    from osteoscreen.dicom_results import sc

    headers = [sr.read_source(data) for data in sources]
    overlays = [_overlay(int(h.Rows), int(h.Columns)) for h in headers]

    def sr_alone(i: int) -> None:
        sr.to_results(sources[i], prediction, algorithm)

    def sc_alone(i: int) -> None:
        sr.encode(sc.build(headers[i], overlays[i], prediction, algorithm))

    def sr_with_sc(i: int) -> None:
        sr.to_results(sources[i], prediction, algorithm, overlay_rgb=overlays[i])

    result = {"sources": list(SOURCES), **_timed(sr_alone, len(sources), repeats), "goal_ms": GOAL_MS}
    result["met"] = result["cpu_median_ms"] < GOAL_MS
    result["overlay_sc"] = _timed(sc_alone, len(sources), repeats)
    result["sr_with_overlay_sc"] = _timed(sr_with_sc, len(sources), repeats)
    return result


def _overlay(rows: int, columns: int) -> np.ndarray:
    """A 512-pixel RGB overlay at the radiograph's aspect, as `osteoscreen.explain.overlay` makes it."""
    scale = min(1.0, 512 / max(rows, columns))
    shape = (max(1, round(rows * scale)), max(1, round(columns * scale)), 3)
    return np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)


def _timed(build, n: int, repeats: int) -> dict:
    for i in range(n):  # warm-up: imports, highdicom's first-use caches
        build(i)
    times, cpu = [], []
    for _ in range(repeats):
        for i in range(n):
            started, started_cpu = time.perf_counter(), time.process_time()
            build(i)
            times.append((time.perf_counter() - started) * 1000)
            cpu.append((time.process_time() - started_cpu) * 1000)
    times.sort()
    median, p95 = statistics.median(times), times[int(0.95 * (len(times) - 1))]
    # CPU time is what one idle core would take; on a shared machine the wall time is that times the contention
    return {"builds": len(times), "median_ms": round(median, 2), "p95_ms": round(p95, 2),
            "cpu_median_ms": round(statistics.median(cpu), 2)}


def note(result: dict) -> str:
    """One line for `make bench`'s notes."""
    if "median_ms" not in result:
        return f"DICOM SR build: not measured ({result.get('note', 'no data')})."
    return (f"DICOM SR build per image (read the source header, build the TID 1500 SR, encode; "
            f"{', '.join(result['sources'])}; {result['builds']} builds): CPU time median {result['cpu_median_ms']:.1f} ms "
            f"(goal < {result['goal_ms']:.0f} ms: {'met' if result['met'] else 'not met'}); wall time median "
            f"{result['median_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms on this machine's load."
            + (f" The explanation overlay as a DICOM Secondary Capture (512-pixel RGB): CPU time median "
               f"{result['overlay_sc']['cpu_median_ms']:.1f} ms alone, {result['sr_with_overlay_sc']['cpu_median_ms']:.1f}"
               f" ms with the SR referencing it (wall {result['sr_with_overlay_sc']['median_ms']:.1f} ms); Explain "
               "pays it after the explanation itself." if "overlay_sc" in result else ""))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    result = measure(parser.parse_args(argv).repeats)
    print(json.dumps(result))
    print(note(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`osteoscreen bench --decode FILE...`: what decoding one input file costs on this machine.

Measured and reported, never asserted in a test: on a busy two-core CI a wall-clock limit fails for
reasons that have nothing to do with the decoder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from osteoscreen.imaging.decode import decode_image, load_image


def measure_decode(path: Path, min_seconds: float = 2.0, min_calls: int = 3) -> dict:
    """Median wall time of `load_image` (bytes -> 224x224 model input) on one file, after one warm-up call."""
    data = Path(path).read_bytes()
    height, width = decode_image(data).shape[:2]  # warm-up: plugin imports are not decode cost
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < min_seconds or len(times) < min_calls:
        t = time.perf_counter()
        load_image(data)
        times.append(time.perf_counter() - t)
    median = float(np.median(times))
    return {"file": str(path), "bytes": len(data), "pixels": [height, width], "calls": len(times),
            "median_ms": round(median * 1e3, 2), "megapixels_per_s": round(height * width / median / 1e6, 1)}


def run_decode(paths: list[Path], min_seconds: float = 2.0) -> str:
    import os

    return json.dumps({"cpu_count": os.cpu_count(), "decode": [measure_decode(p, min_seconds) for p in paths]},
                      indent=2)

"""`osteoscreen bench --decode FILE...`: what decoding one input file costs on this machine.

Measured and reported, never asserted in a test: on a busy two-core CI a wall-clock limit fails for
reasons that have nothing to do with the decoder.
"""

from __future__ import annotations

import json
import os
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
    return json.dumps({"cpu_count": os.cpu_count(), "decode": [measure_decode(p, min_seconds) for p in paths]},
                      indent=2)


def _cpu_median(call, repeats: int) -> float:
    """Median CPU seconds (time.process_time: this process, all threads) of `call()` after one warm-up call:
    unlike wall time, other load on a shared machine barely moves it."""
    call()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        call()
        times.append(time.process_time() - t)
    return float(np.median(times))


def compare_jpeg2000_reduce(path: Path, repeats: int = 7) -> dict:
    """A JPEG 2000 DICOM decoded in full vs with 1, 2, ... wavelet levels discarded: CPU per image of
    `load_image` (bytes -> model input) and how far each model input is from the full decode's, in grey
    levels (0..255). `levels` marks the one the server takes (imaging.jpeg2000.FLOOR); the others show
    what a different floor would cost or save."""
    from osteoscreen.imaging import jpeg2000

    data = Path(path).read_bytes()
    saved = jpeg2000.ENABLED, jpeg2000.FLOOR
    try:
        jpeg2000.ENABLED = False
        full = load_image(data)
        full_shape = decode_image(data).shape
        full_ms = _cpu_median(lambda: load_image(data), repeats) * 1e3
        jpeg2000.ENABLED = True
        jpeg2000.FLOOR = saved[1]
        served_shape = decode_image(data).shape
        rows = []
        for discard in range(1, 6):
            side = -(-min(full_shape) // (1 << discard))
            jpeg2000.FLOOR = side  # the floor at which exactly `discard` levels go (if the codestream has them)
            shape = decode_image(data).shape
            if shape == full_shape or (rows and tuple(rows[-1]["shape"]) == shape):
                break  # fell back to the full decode, or no more levels to discard
            reduced = load_image(data)
            diff = np.abs(reduced - full)
            ms = _cpu_median(lambda: load_image(data), repeats) * 1e3
            rows.append({"levels": discard, "shape": list(shape), "served": shape == served_shape,
                         "cpu_ms": round(ms, 1), "speedup": round(full_ms / ms, 1),
                         "max_abs_diff": round(float(diff.max()), 2), "mean_abs_diff": round(float(diff.mean()), 3)})
    finally:
        jpeg2000.ENABLED, jpeg2000.FLOOR = saved
    return {"file": Path(path).name, "shape": list(full_shape), "full_cpu_ms": round(full_ms, 1), "floor": saved[1],
            "reduced": rows}


def run_jpeg2000_reduce(paths: list[Path], repeats: int = 7) -> str:
    return json.dumps({"cpu_count": os.cpu_count(),
                       "jpeg2000_reduce": [compare_jpeg2000_reduce(p, repeats) for p in paths]}, indent=2)

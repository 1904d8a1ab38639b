"""`osteoscreen bench`: raw model throughput, the yardstick the serving benchmark divides by.

Raw means no server: the extractor (and, with a registered model, the Random Forest) called in this
process on ready 224x224 inputs, so decoding and transport costs are excluded on purpose.
"""

from __future__ import annotations

import json
import time

import numpy as np


def _rate(fn, batch: np.ndarray, min_seconds: float) -> dict:
    fn(batch)  # warm-up: graph tracing and allocation are not throughput
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < min_seconds or len(times) < 3:
        t = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t)
    per_call = float(np.median(times))
    return {"batch": len(batch), "calls": len(times), "median_call_ms": round(per_call * 1e3, 2),
            "images_per_s": round(len(batch) / per_call, 2)}


def measure(predict_fn, batch_sizes=(1, 8, 32), min_seconds: float = 5.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [_rate(predict_fn, rng.uniform(0, 255, (b, 224, 224, 1)).astype(np.float32), min_seconds) for b in batch_sizes]


def run_raw(backbone: str = "vgg16", model_tag: str | None = None, batch_sizes=(1, 8, 32), min_seconds: float = 5.0) -> str:
    import os

    from osteoscreen.model.threads import limit_threads

    limits = limit_threads()  # as the model service does (OSTEOSCREEN_CPUS overrides, to compare pool sizes)
    if model_tag:
        from osteoscreen.model import bundle

        model = bundle.load(model_tag)
        fn, what = model.probabilities, f"{model.tag} (extractor + calibrated RF)"
    else:
        from osteoscreen.model.backbones import build_extractor

        extractor = build_extractor(backbone)
        fn, what = extractor.predict_on_batch, f"{backbone} extractor (all candidate features)"
    result = {"model": what, "cpu_count": os.cpu_count(), "tf_intra_op_threads": limits.intra_op,
              "tf_inter_op_threads": limits.inter_op, "results": measure(fn, batch_sizes, min_seconds)}
    return json.dumps(result, indent=2)

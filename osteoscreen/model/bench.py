"""`osteoscreen bench`: raw model throughput, the yardstick the serving benchmark divides by, in one or more
compute precisions (`--precision float32 auto` measures both back to back and gives their ratios).

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


def run_raw(backbone: str = "vgg16", model_tag: str | None = None, batch_sizes=(1, 8, 32), min_seconds: float = 5.0,
            precisions: list[str] | None = None, runtime: str | None = None, force: bool = False) -> str:
    """Raw throughput in each of `precisions` (default: $OSTEOSCREEN_PRECISION, else auto), back to back in
    this one process, so that their ratios mean something on a shared machine; `results` is the first one's.

    With a registered model the numerics gate applies as in serving (`force`: run what it refuses, marked);
    without one, the extractor with every candidate feature in the fastest natively run combination asked for
    (int8 then calibrates on random inputs: throughput only, its features mean nothing)."""
    import os

    from osteoscreen.model import precision as precision_mod
    from osteoscreen.model.threads import limit_threads

    limits = limit_threads()  # as the model service does (OSTEOSCREEN_CPUS overrides, to compare pool sizes)

    runs = []
    built: dict = {}
    for asked in precisions or [None]:
        if model_tag:
            from osteoscreen.model import bundle

            model = bundle.load(model_tag, precision=asked, runtime=runtime, force=force)
            fn, what, reason = model.probabilities, f"{model.tag} (extractor + calibrated RF)", model.precision_reason
            combo, forced = precision_mod.Combo(model.runtime, model.precision), model.forced
        else:
            found, _ = precision_mod.candidates(precision_mod.requested_runtime(runtime), precision_mod.requested(asked),
                                                precision_mod.detect(), precision_mod.openvino_installed())
            combo, forced = found[0], False
            fn, what, reason = _extractor(backbone, combo, built), f"{backbone} extractor (all candidate features)", \
                f"{combo.key} (requested runtime {runtime or 'default'}, precision {asked or 'default'})"
        runs.append({"requested": asked or precision_mod.requested(), "runtime": combo.runtime,
                     "precision": combo.precision, "forced": forced, "reason": reason,
                     "results": measure(fn, batch_sizes, min_seconds)})
    first = runs[0]
    result = {"model": what, "cpu_count": os.cpu_count(), "tf_intra_op_threads": limits.intra_op,
              "tf_inter_op_threads": limits.inter_op, "runtime": first["runtime"], "precision": first["precision"],
              "results": first["results"]}
    if len(runs) > 1:
        result["by_precision"] = runs
        result["ratios_to_first"] = [
            {"runtime": run["runtime"], "precision": run["precision"], "requested": run["requested"],
             "batch": row["batch"], "throughput_x": round(row["images_per_s"] / ref["images_per_s"], 3),
             "call_time_x": round(row["median_call_ms"] / ref["median_call_ms"], 3)}
            for run in runs[1:] for row, ref in zip(run["results"], first["results"])]
    return json.dumps(result, indent=2)


def _extractor(backbone: str, combo, built: dict):
    """`combo`'s predict function for the ImageNet extractor, the Keras model built once per process."""
    from osteoscreen.model import openvino_runtime
    from osteoscreen.model.backbones import build_extractor, with_precision
    from osteoscreen.resources import cpu_budget

    if "keras" not in built:
        built["keras"] = build_extractor(backbone)
    if combo.runtime == "tensorflow":
        return with_precision(built["keras"], combo.precision).predict_on_batch
    if "openvino" not in built:
        built["openvino"] = openvino_runtime.convert(built["keras"])
    model = built["openvino"]
    if combo.precision == "int8":
        rng = np.random.default_rng(1)
        model = openvino_runtime.quantize(model, list(rng.uniform(0, 255, (32, 224, 224, 1)).astype(np.float32)))
    return openvino_runtime.OpenVINOExtractor(model, combo.precision, threads=max(1, int(cpu_budget()))).predict_on_batch

"""The extractor on OpenVINO: converted from the Keras extractor (which stays the one that is built, folded and
tested), compiled in float32 or bfloat16, or quantised to int8 with NNCF.

Why OpenVINO at all: on CPUs without AMX, TensorFlow has no int8 path, and int8 on VNNI is what reaches ~3x
float32 here (`precision.SPEED_ORDER`). Why these settings:
- `PERFORMANCE_HINT=LATENCY`: the model service calls the extractor from one thread, one batch at a time;
  THROUGHPUT splits the cores into streams that one synchronous request cannot fill (it halved throughput here).
- `INFERENCE_PRECISION_HINT` is explicit: on a bfloat16-capable CPU OpenVINO would otherwise compute a float32
  model in bfloat16 by itself, and float32 must mean float32 (the reference the gate compares with).
- int8 keeps the first convolution in float32 (`ignored_scope`): it carries the folded preprocessing (offsets
  of ~-100 over a one-channel input); quantising it too took the pooled features' correlation with float32
  from >= 0.996 to 0.25.
- `CACHE_DIR`: compiling the int8 model from its IR takes seconds; the cache keeps start-up well under 30 s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from osteoscreen.errors import ModelIntegrityError
from osteoscreen.model.precision import BFLOAT16, FLOAT32, INT8, RuntimeUnavailableError
from osteoscreen.model.weights import sha256_file

log = logging.getLogger("osteoscreen.openvino")

HINTS = {FLOAT32: "f32", BFLOAT16: "bf16", INT8: "f32"}  # int8: what is not quantised stays float32
CALIBRATION_IMAGES = 64  # NNCF's statistics are stable from ~32 images (measured); more cost minutes at batch 1


def require() -> Any:
    """The `openvino` module, or a clear error (it is optional in the sense that TensorFlow serves without it)."""
    try:
        import openvino
    except ImportError as exc:
        raise RuntimeUnavailableError(f"OpenVINO is not installed ({exc}); pip install openvino, or use "
                                      "--runtime tensorflow (OSTEOSCREEN_RUNTIME=tensorflow)") from exc
    return openvino


def convert(extractor) -> Any:
    """The Keras extractor as an OpenVINO model: same input (`gray`, N x 224 x 224 x 1) and named outputs."""
    ov = require()
    return ov.convert_model(extractor, example_input=np.zeros((1, 224, 224, 1), np.float32))


def first_convolution(model) -> str:
    """The friendly name of the first convolution in execution order: the folded one."""
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Convolution":
            return op.get_friendly_name()
    raise ValueError("the model has no convolution")


def quantize(model, images: Sequence[np.ndarray], subset_size: int = CALIBRATION_IMAGES) -> Any:
    """int8 by NNCF post-training quantisation, calibrated on `images` (the training split's original images,
    (224, 224, 1) each), the first convolution kept in float32."""
    require()
    import nncf

    images = [np.asarray(image, np.float32) for image in list(images)[:subset_size]]
    if not images:
        raise ValueError("int8 calibration needs at least one image")
    with _stdout_to_stderr():  # NNCF logs and draws progress bars on stdout, which carries the CLI's JSON
        return nncf.quantize(model, nncf.Dataset(images, lambda image: image[None]), subset_size=len(images),
                             ignored_scope=nncf.IgnoredScope(names=[first_convolution(model)]))


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 pointed at 2 for the block: NNCF's handlers hold stdout itself, not `sys.stdout`."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def only(model, features: Sequence[str]) -> Any:
    """`model` cut to the outputs `features`: what feeds no kept output is dropped, what is kept (quantisation
    parameters included) stays as it was, so the features are the ones the forest was fitted on."""
    ov = require()
    results = [result for result in model.get_results() if result.output(0).get_names() & set(features)]
    missing = set(features) - {name for r in results for name in r.output(0).get_names()}
    if missing:
        raise ValueError(f"the OpenVINO model has no outputs {sorted(missing)}")
    return ov.Model(results, model.get_parameters(), model.get_friendly_name())


def save(model, xml: Path) -> dict:
    """Write the IR (xml + bin) and return what the model card records of it. Weights are not compressed to
    float16 (save_model's default): float32 must stay float32."""
    ov = require()
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml), compress_to_fp16=False)
    binary = xml.with_suffix(".bin")
    return {"xml": xml.name, "xml_sha256": sha256_file(xml), "bin": binary.name, "bin_sha256": sha256_file(binary)}


def read(folder: Path, record: dict) -> Any:
    """The stored IR, after checking both files against the sha256 the card recorded at registration."""
    ov = require()
    for part in ("xml", "bin"):
        path = folder / record[part]
        if not path.exists() or sha256_file(path) != record[f"{part}_sha256"]:
            raise ModelIntegrityError(f"OpenVINO model file {path} is missing or differs from the one registered "
                                      f"(sha256 {record[f'{part}_sha256'][:16]}...)")
    return ov.Core().read_model(str(folder / record["xml"]))


class OpenVINOExtractor:
    """A compiled OpenVINO extractor with the Keras extractor's calling convention: (N, 224, 224, 1) float32 ->
    {feature name: (N, C) float32}. One inference request per calling thread, reused: the batcher and the
    explainer's thread both call it, and an OpenVINO InferRequest must not run two inferences at once."""

    def __init__(self, model, precision: str, threads: int | None = None, cache_dir: Path | None = None):
        ov = require()
        if precision not in HINTS:
            raise ValueError(f"precision must be one of {', '.join(HINTS)}, not {precision!r}")
        core = ov.Core()
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": HINTS[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.precision = precision
        self.compiled = core.compile_model(model, "CPU", config)
        self._names = [output.get_any_name() for output in self.compiled.outputs]
        self._local = threading.local()

    def predict_on_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        results = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return {name: np.array(results[output], dtype=np.float32)
                for name, output in zip(self._names, self.compiled.outputs)}


__all__ = ["CALIBRATION_IMAGES", "HINTS", "OpenVINOExtractor", "convert", "first_convolution", "only", "quantize",
           "read", "require", "save"]

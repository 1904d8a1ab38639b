"""The served VGG16 extractor in pure PyTorch, and its GPU benchmark for the lent GPU machine as it is.

That machine has PyTorch and NumPy but no TensorFlow or Keras, installs nothing, and takes 64 MiB per call. So
`python -m loadtest.gpu_export` (here, with Keras) writes the extractor's weights, a few phantom images as model
input and their Keras float32 features into one folder (`build/gpu`), and this module, which imports only torch,
numpy and the standard library (no `osteoscreen`), computes the same features from it:

    python3 -m loadtest.gpu_torch --bundle build/gpu --out OUT            # on the GPU machine (CUDA)
    python -m loadtest.gpu_torch --bundle build/gpu --out OUT --smoke     # here, on the CPU: proves it runs

On CUDA it times float32 (cuDNN in IEEE float32: TF32 off), tf32 (PyTorch's default for convolutions on this
GPU) and bfloat16 at batch 1, 8, 32, 128 and 256, in NCHW and channels_last, once more from host NumPy arrays to
host features (what serving pays), and, while the time budget lasts, torch.compile'd bfloat16. Each precision's
features on the carried images are compared with the carried Keras CPU float32 features. It writes
`gpu_torch.json` after every measured row (a run stopped by `timeout` keeps what it measured) and `gpu_torch.md`.

Why the computation is what it is: the Keras extractor takes (N, 224, 224, 1) intensities 0..255 in NHWC,
appends a constant-one channel (the folded preprocessing offset: `osteoscreen/model/backbones.py`), runs VGG16's
3x3 'same' convolutions with ReLU and 2x2 max pools, and globally average- and max-pools the tapped block
outputs. Keras kernels are (h, w, in, out); torch's are (out, in, h, w). In bfloat16 the first convolution and
the global pooling stay float32, as `backbones.with_precision` keeps them in the served model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loadtest.gpu_bundle import Bundle, load_bundle

PRECISIONS = ("float32", "tf32", "bfloat16")
BATCHES = (1, 8, 32, 128, 256)
SMOKE_BATCHES = (1, 2)
# agreement with the Keras CPU float32 features (relative L2 per image, worst output): float32 differs by summation
# order only (~1e-6); tf32 and bfloat16 round (TensorFlow bfloat16 on CPU: 0.15-0.45%, docs/results/precision.md)
AGREEMENT_BOUNDS = {"float32": 1e-4, "tf32": 1e-2, "bfloat16": 3e-2}


class GrayExtractor(torch.nn.Module):
    """The one-channel extractor of a bundle: (N, 224, 224, 1) float32 0..255 -> {feature name: (N, C) float32}.

    `precision` "bfloat16" runs every convolution but the first in bfloat16 (weights and activations); "float32"
    and "tf32" are both float32 tensors (which cuDNN algorithm runs them is `conv_precision`'s business).
    """

    def __init__(self, manifest: dict, weights: dict[str, np.ndarray], precision: str = "float32",
                 channels_last: bool = False):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.ops = manifest["ops"]
        self.outputs = manifest["outputs"]  # feature name -> {"layer": tapped op, "pool": "avg" | "max"}
        self.taps = {spec["layer"] for spec in self.outputs.values()}
        self.precision = precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.compute_dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        first = True
        for op in self.ops:
            if op["op"] != "conv":
                continue
            kernel = weights[f"{op['name']}.kernel"]  # Keras (h, w, in, out)
            if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0 or op.get("strides", [1, 1]) != [1, 1]:
                raise ValueError(f"{op['name']}: only odd kernels at stride 1 ('same' = symmetric padding)")
            dtype = torch.float32 if first else self.compute_dtype  # the first conv carries the folded offsets
            first = False
            weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).to(dtype)
            self.register_buffer(f"{op['name']}_weight", weight.contiguous(memory_format=self.memory_format))
            self.register_buffer(f"{op['name']}_bias", torch.from_numpy(weights[f"{op['name']}.bias"]).to(dtype))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW (a view)
        x = torch.cat([x, torch.ones_like(x)], dim=1).contiguous(memory_format=self.memory_format)
        pooled: dict[str, torch.Tensor] = {}
        for op in self.ops:
            if op["op"] == "conv":
                weight = getattr(self, f"{op['name']}_weight")
                x = F.conv2d(x.to(weight.dtype), weight, getattr(self, f"{op['name']}_bias"),
                             padding=(weight.shape[2] // 2, weight.shape[3] // 2))
                if op["activation"] == "relu":
                    x = F.relu(x)
            elif op["op"] == "maxpool":
                x = F.max_pool2d(x, kernel_size=op["pool_size"], stride=op["strides"])
            else:
                raise ValueError(f"unknown op {op['op']!r}")
            if op["name"] in self.taps:
                fmap = x.float()  # global pooling in float32, as served
                pooled[op["name"] + ".avg"] = fmap.mean(dim=(2, 3))
                pooled[op["name"] + ".max"] = fmap.amax(dim=(2, 3))
        return {name: pooled[f"{spec['layer']}.{spec['pool']}"] for name, spec in self.outputs.items()}


@contextlib.contextmanager
def conv_precision(precision: str) -> Iterator[None]:
    """cuDNN's float32 convolutions in IEEE float32 ("float32") or TF32 ("tf32", PyTorch's default for cuDNN
    convolutions), restored afterwards. Newer PyTorch has `fp32_precision`; mixing it with the older
    `allow_tf32` flag raises, so only one of the two is touched."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        previous = conv.fp32_precision
        conv.fp32_precision = "tf32" if precision == "tf32" else "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = previous
    else:
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = previous


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call, device: torch.device, warmup: int, min_seconds: float, min_calls: int,
               max_calls: int = 10_000) -> tuple[float, list[float]]:
    """(seconds of the `warmup` calls: cuDNN's algorithm search, compilation, allocation; seconds per timed call),
    each timed call bracketed by a device synchronisation so the time is the GPU's work, not the launch."""
    started = time.perf_counter()
    for _ in range(warmup):
        call()
    _sync(device)
    warmup_s = time.perf_counter() - started
    times: list[float] = []
    started = time.perf_counter()
    while (len(times) < min_calls or time.perf_counter() - started < min_seconds) and len(times) < max_calls:
        t = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - t)
    return warmup_s, times


def agreement(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict:
    """Per output: relative L2 error per image (max, median), median element relative error (elements whose
    reference is at least 1e-3 of that output's largest, so dead ReLU channels do not divide by zero), and the
    smallest cosine similarity per image; `worst_rel_l2` and `min_cosine` over all outputs."""
    per_output = {}
    for name, ref in reference.items():
        ref = ref.astype(np.float64)
        out = got[name].astype(np.float64)
        rel_l2 = np.linalg.norm(out - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
        cosine = (out * ref).sum(axis=1) / np.maximum(np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1), 1e-30)
        big = np.abs(ref) >= 1e-3 * np.abs(ref).max()
        element = np.abs(out - ref)[big] / np.abs(ref)[big]
        per_output[name] = {"rel_l2_max": float(rel_l2.max()), "rel_l2_median": float(np.median(rel_l2)),
                            "element_rel_median": float(np.median(element)) if element.size else 0.0,
                            "cosine_min": float(cosine.min())}
    worst = max(per_output, key=lambda n: per_output[n]["rel_l2_max"])
    return {"worst_rel_l2": per_output[worst]["rel_l2_max"], "worst_output": worst,
            "median_rel_l2": float(np.median([v["rel_l2_median"] for v in per_output.values()])),
            "min_cosine": min(v["cosine_min"] for v in per_output.values()), "outputs": per_output}


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "device": str(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


@dataclass(frozen=True)
class Row:
    variant: str  # nchw | channels_last | host (channels_last, numpy in and out) | compile (channels_last)
    precision: str
    batch: int


def plan(batches: Sequence[int], precisions: Sequence[str], compile_batches: Sequence[int], host: bool) -> list[Row]:
    """The rows in the order they run: the eager layouts for every precision first (the table's core), then
    host-to-host, then the compiled rows, which cost compilation time and go last so the budget cuts them first."""
    rows = [Row(v, p, b) for p in precisions for v in ("nchw", "channels_last") for b in batches]
    if host:
        rows += [Row("host", p, b) for p in precisions for b in batches]
    rows += [Row("compile", "bfloat16", b) for b in compile_batches if "bfloat16" in precisions]
    return rows


class Bench:
    """Builds each (variant, precision) model once and measures rows and agreement with it."""

    def __init__(self, bundle: Bundle, device: torch.device, warmup: int, min_seconds: float, min_calls: int):
        self.bundle, self.device = bundle, device
        self.warmup, self.min_seconds, self.min_calls = warmup, min_seconds, min_calls
        self.models: dict[tuple[str, str], object] = {}

    def model(self, variant: str, precision: str):
        variant = "channels_last" if variant == "host" else variant  # the same module, fed from the host
        key = (variant, precision)
        if key not in self.models:
            module = GrayExtractor(self.bundle.manifest, self.bundle.weights, precision,
                                   channels_last=variant != "nchw").to(self.device).eval()
            self.models[key] = torch.compile(module, dynamic=False) if variant == "compile" else module
        return self.models[key]

    def measure(self, row: Row) -> dict:
        model = self.model(row.variant, row.precision)
        generator = torch.Generator().manual_seed(row.batch)
        host_batch = (torch.rand((row.batch, 224, 224, 1), generator=generator) * 255).numpy()
        on_device = torch.from_numpy(host_batch).to(self.device)

        def device_call() -> None:
            model(on_device)

        def host_call() -> None:  # as serving calls it: numpy in, numpy features out
            out = model(torch.from_numpy(host_batch).to(self.device))
            {name: t.cpu().numpy() for name, t in out.items()}

        with torch.inference_mode(), conv_precision(row.precision):
            warmup_s, times = time_calls(host_call if row.variant == "host" else device_call, self.device,
                                         self.warmup, self.min_seconds, self.min_calls)
        median = float(np.median(times))
        return {"variant": row.variant, "precision": row.precision, "batch": row.batch, "calls": len(times),
                "median_ms": round(median * 1e3, 3), "p90_ms": round(float(np.percentile(times, 90)) * 1e3, 3),
                "images_per_s": round(row.batch / median, 1), "warmup_s": round(warmup_s, 2),
                "seconds": round(warmup_s + sum(times), 2)}

    def features(self, variant: str, precision: str, batch: int | None = None) -> dict[str, np.ndarray]:
        """Features of the carried images; `batch` pads them (repeated) to a batch a compiled model already has."""
        model = self.model(variant, precision)
        images = self.bundle.images
        if batch is not None and batch > len(images):
            images = np.concatenate([images] * -(-batch // len(images)))[:batch]
        with torch.inference_mode(), conv_precision(precision):
            out = model(torch.from_numpy(images).to(self.device))
        return {name: t.float().cpu().numpy()[: len(self.bundle.images)] for name, t in out.items()}


def report(result: dict) -> str:
    """The markdown tables for docs/results."""
    env, weights = result["environment"], result["weights"]
    where = env.get("gpu", env.get("cpu", "cpu"))
    lines = [f"## VGG16 extractor in PyTorch on {where} ({env['device']})", "",
             f"torch {env['torch']}" + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if "cuda" in env else "")
             + f", Python {env['python']}. Extractor `{result['model']}`, {len(result['outputs'])} outputs "
             f"({', '.join(result['outputs'])}). Weights: {weights}.", "",
             "Inputs already on the device (`host`: NumPy float32 in, NumPy features out, copies included); "
             "median of timed calls after warm-up, each call synchronised. x float32: against the same variant's "
             "float32 row at that batch.", "",
             "| variant | precision | batch | images/s | median ms/batch | p90 ms | x float32 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    base = {(r["variant"], r["batch"]): r for r in result["rows"] if r.get("precision") == "float32" and "median_ms" in r}
    for r in result["rows"]:
        if "median_ms" not in r:
            why = str(r.get("skipped", r.get("error"))).replace("|", "/")
            lines.append(f"| {r['variant']} | {r['precision']} | {r['batch']} | {why} | | | |")
            continue
        ref = base.get((r["variant"], r["batch"])) or base.get(("channels_last", r["batch"]))
        ratio = f"{r['images_per_s'] / ref['images_per_s']:.2f}" if ref else ""
        lines.append(f"| {r['variant']} | {r['precision']} | {r['batch']} | {r['images_per_s']:.1f} | "
                     f"{r['median_ms']:.2f} | {r['p90_ms']:.2f} | {ratio} |")
    n = result["reference_images"]
    lines += ["", f"Features against the carried Keras (TensorFlow CPU) float32 features of {n} phantom images "
              f"(relative L2 per image; bound per precision: {AGREEMENT_BOUNDS}):", "",
              "| variant | precision | worst rel L2 (output) | median rel L2 | median element rel err | min cosine | within bound |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for a in result["agreement"]:
        if "error" in a:
            lines.append(f"| {a['variant']} | {a['precision']} | {a['error'].replace('|', '/')} | | | | |")
            continue
        med_el = float(np.median([o["element_rel_median"] for o in a["outputs"].values()]))
        lines.append(f"| {a['variant']} | {a['precision']} | {a['worst_rel_l2']:.2e} ({a['worst_output']}) | "
                     f"{a['median_rel_l2']:.2e} | {med_el:.2e} | {a['min_cosine']:.6f} | {a['within_bound']} |")
    first = next((a for a in result["agreement"] if "outputs" in a), None)
    if first is not None:
        lines += ["", f"Per output ({first['variant']}), relative L2 max / median element relative error / min cosine:",
                  "", "| output | " + " | ".join(p for p in result["precisions"]) + " |",
                  "| --- |" + " --- |" * len(result["precisions"])]
        by = {a["precision"]: a for a in result["agreement"] if a["variant"] == first["variant"] and "outputs" in a}
        for name in result["outputs"]:
            cells = [f"{by[p]['outputs'][name]['rel_l2_max']:.2e} / {by[p]['outputs'][name]['element_rel_median']:.2e}"
                     f" / {by[p]['outputs'][name]['cosine_min']:.5f}" if p in by else "" for p in result["precisions"]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Total {result['seconds']:.0f} s" + (f"; {result['skipped']} rows skipped (time budget "
              f"{result['budget_s']} s)" if result["skipped"] else "") + "."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.gpu_torch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="build/gpu", help="the folder `python -m loadtest.gpu_export` wrote")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--smoke", action="store_true",
                        help="a short run anywhere (the CPU too): batches 1 and 2, one timed call, no compile")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS)
    parser.add_argument("--compile-batches", type=int, nargs="*", default=[32, 256],
                        help="batches of the torch.compile'd bfloat16 rows (none: skip compilation)")
    parser.add_argument("--no-host", action="store_true", help="skip the NumPy-in, NumPy-out rows")
    parser.add_argument("--min-seconds", type=float, help="timed seconds per row, at least (0.5; --smoke: one call)")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="no new row starts after this many seconds (run it under `timeout` too)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    device = torch.device("cuda" if (args.device == "cuda" or (args.device == "auto" and cuda)) else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: a CPU run would be mislabelled as a GPU result (use --smoke to check the script)",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    bundle = load_bundle(Path(args.bundle))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # per-shape algorithm search, paid in the warm-up calls
    batches = args.batches or (SMOKE_BATCHES if args.smoke else BATCHES)
    precisions = args.precisions or [p for p in PRECISIONS if device.type == "cuda" or p != "tf32"]
    compile_batches = [] if args.smoke and args.compile_batches == [32, 256] else args.compile_batches
    warmup, min_calls = (1, 1) if args.smoke else (3, 5)
    min_seconds = args.min_seconds if args.min_seconds is not None else (0.0 if args.smoke else 0.5)
    bench = Bench(bundle, device, warmup, min_seconds, min_calls)
    weights = bundle.manifest["weights"]
    result = {"model": bundle.manifest["model"], "outputs": list(bundle.manifest["outputs"]),
              "weights": weights["description"], "random_weights": weights["random"],
              "environment": environment(device), "smoke": args.smoke, "budget_s": args.budget_s,
              "precisions": precisions, "reference_images": len(bundle.images), "rows": [], "agreement": [],
              "skipped": 0, "seconds": 0.0, "bundle": {k: bundle.manifest[k] for k in ("created", "reference")}}
    print(f"{result['environment']}; weights: {weights['description']}", flush=True)

    def save() -> None:
        result["seconds"] = round(time.perf_counter() - started, 1)
        (out / "gpu_torch.json").write_text(json.dumps(result, indent=2))

    # agreement first: it is the check that the numbers below measure the right computation
    for variant in ("nchw", "channels_last"):
        for precision in precisions:
            entry = {"variant": variant, "precision": precision}
            try:
                entry.update(agreement(bundle.reference, bench.features(variant, precision)))
                entry["within_bound"] = entry["worst_rel_l2"] <= AGREEMENT_BOUNDS[precision]
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
            result["agreement"].append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k != "outputs"}), flush=True)
    save()
    for row in plan(batches, precisions, compile_batches, host=not args.no_host):
        if time.perf_counter() - started > args.budget_s:
            result["rows"].append({"variant": row.variant, "precision": row.precision, "batch": row.batch,
                                   "skipped": "skipped: time budget"})
            result["skipped"] += 1
            continue
        try:
            measured = bench.measure(row)
        except Exception as exc:  # noqa: BLE001 - one failing row (out of memory, no compiler) must not lose the rest
            measured = {"variant": row.variant, "precision": row.precision, "batch": row.batch,
                        "error": f"{type(exc).__name__}: {exc}"[:300]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["rows"].append(measured)
        print(json.dumps(measured), flush=True)
        save()
    compiled = [r["batch"] for r in result["rows"] if r["variant"] == "compile" and "median_ms" in r]
    if compiled:  # at a batch it was compiled for: no second compilation
        entry = {"variant": "compile", "precision": "bfloat16"}
        try:
            entry.update(agreement(bundle.reference, bench.features("compile", "bfloat16", compiled[0])))
            entry["within_bound"] = entry["worst_rel_l2"] <= AGREEMENT_BOUNDS["bfloat16"]
        except Exception as exc:  # noqa: BLE001
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        result["agreement"].append(entry)
    save()
    markdown = report(result)
    (out / "gpu_torch.md").write_text(markdown + "\n")
    print(markdown)
    float32_ok = all(a.get("within_bound") for a in result["agreement"] if a["precision"] == "float32")
    if not float32_ok:
        print("float32 features do not match the Keras float32 reference: the numbers measure something else",
              file=sys.stderr)
    return 0 if float32_ok else 3


if __name__ == "__main__":
    sys.exit(main())

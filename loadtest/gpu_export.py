"""Export the served extractor for the GPU machine, which has PyTorch but no TensorFlow (`make bench-gpu-torch`).

    python -m loadtest.gpu_export [--out build/gpu] [--model TAG] [--images 8] [--random-weights]

Writes a folder that `python3 -m loadtest.gpu_torch` reads there with torch and numpy alone:

- `extractor.npz`: the Keras extractor's convolution weights as Keras holds them ((h, w, in, out) kernels, the
  first one already folded to [gray, ones] input), only the layers the features need, float32: the GPU's float32
  row is then compared with the same numbers Keras ran, and no rounding of ours enters the agreement figure;
- `reference.npz`: phantom radiographs decoded exactly as serving decodes them (`load_image`: the model input,
  (N, 224, 224, 1) float32 0..255) and the Keras CPU float32 features of them;
- `manifest.json`: the layer sequence, which pooled layer each feature is, the weights' provenance, and each
  file's sha256 and size.

Default: the extractor built fresh from the verified ImageNet weights (`osteoscreen weights`) with every candidate
feature, what `osteoscreen bench` measures; `--model TAG` exports a registered bundle's extractor (its features
only). Without verified weights it refuses, unless `--random-weights` asks for random ones (throughput only, and
the output says so). The folder must travel with the repository's tracked files in 64 MiB, so it refuses to write
more than `--max-mib` (60).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loadtest.gpu_bundle import BUNDLE_FORMAT, MANIFEST_FILE, REFERENCE_FILE, WEIGHTS_FILE, sha256_file

DEFAULT_OUT = "build/gpu"
DEFAULT_MAX_MIB = 60.0


def trunk_ops(extractor) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The extractor's nested trunk as plain ops, and its weights; refuses anything but a plain
    conv / max-pool stack (VGG16), which is all `gpu_torch.GrayExtractor` computes."""
    import keras

    names = [type(layer).__name__ for layer in extractor.layers]
    if "AppendOnes" not in names:
        raise ValueError(f"{extractor.name}: no AppendOnes layer; not a folded one-channel extractor")
    trunks = [layer for layer in extractor.layers if isinstance(layer, keras.Model)]
    if len(trunks) != 1:
        raise ValueError(f"{extractor.name}: expected one nested trunk model, found {len(trunks)}")
    ops, weights = [], {}
    for layer in trunks[0].layers:
        cfg = layer.get_config()
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise ValueError(f"{layer.name}: data_format {cfg['data_format']}")
        if isinstance(layer, keras.layers.Conv2D) and type(layer) is keras.layers.Conv2D:
            if (cfg["padding"] != "same" or tuple(cfg["strides"]) != (1, 1) or tuple(cfg["dilation_rate"]) != (1, 1)
                    or cfg.get("groups", 1) != 1 or not cfg["use_bias"] or cfg["activation"] not in ("relu", "linear")):
                raise ValueError(f"{layer.name}: only 'same' stride-1 convolutions with bias and ReLU are exported")
            kernel, bias = layer.get_weights()
            weights[f"{layer.name}.kernel"] = np.asarray(kernel, np.float32)
            weights[f"{layer.name}.bias"] = np.asarray(bias, np.float32)
            ops.append({"op": "conv", "name": layer.name, "kernel": list(kernel.shape), "strides": [1, 1],
                        "padding": "same", "activation": cfg["activation"]})
        elif isinstance(layer, keras.layers.MaxPooling2D):
            if cfg["padding"] != "valid":
                raise ValueError(f"{layer.name}: only 'valid' max pooling is exported")
            ops.append({"op": "maxpool", "name": layer.name, "pool_size": list(cfg["pool_size"]),
                        "strides": list(cfg["strides"] or cfg["pool_size"])})
        else:
            raise ValueError(f"{layer.name}: {type(layer).__name__} is not exported (VGG16-style trunks only)")
    return ops, weights


def describe(extractor, spec) -> tuple[list[dict], dict[str, np.ndarray], dict[str, dict]]:
    """(ops up to the deepest tapped layer, their weights, feature name -> {layer, pool}) for `extractor`."""
    ops, weights = trunk_ops(extractor)
    outputs = {}
    for name in extractor.output_names:
        short, pool = name.rsplit("_", 1)
        if short not in spec.feature_layers or pool not in ("avg", "max"):
            raise ValueError(f"output {name!r} is not a `<layer>_<avg|max>` feature of {spec.name}")
        outputs[name] = {"layer": spec.feature_layers[short], "pool": pool}
    order = [op["name"] for op in ops]
    missing = sorted({o["layer"] for o in outputs.values()} - set(order))
    if missing:
        raise ValueError(f"tapped layers {missing} are not in the trunk")
    deepest = max(order.index(o["layer"]) for o in outputs.values())
    kept = ops[: deepest + 1]  # nothing after the deepest tap: its weights would travel for nothing
    kept_weights = {k: v for k, v in weights.items() if k.split(".")[0] in {op["name"] for op in kept}}
    return kept, kept_weights, outputs


def phantom_inputs(n: int, seed: int) -> np.ndarray:
    """`n` phantom radiographs as serving feeds them to the model: PNG bytes -> `load_image`."""
    from osteoscreen.imaging.decode import load_image
    from training.phantom import generate_dataset

    with tempfile.TemporaryDirectory(prefix="osteoscreen-gpu-export-") as tmp:
        generate_dataset(Path(tmp) / "set", n=n, seed=seed)
        paths = sorted((Path(tmp) / "set").rglob("*.png"))
        return np.stack([load_image(p.read_bytes()) for p in paths]).astype(np.float32)


def load_extractor(model_tag: str | None, random_weights: bool):
    """(the float32 Keras extractor, the backbone spec, a weights record for the manifest)."""
    from osteoscreen.errors import WeightsError
    from osteoscreen.model import weights as weights_mod
    from osteoscreen.model.backbones import build_extractor
    from osteoscreen.model.specs import get_spec

    if model_tag:
        import keras

        from osteoscreen.model import bundle
        from osteoscreen.model.backbones import AppendOnes  # noqa: F401 - registers the layer the file names

        tag, card = bundle.card_of(model_tag)
        metrics = card.get("metrics", {})
        extractor = keras.saving.load_model(bundle.stored_file(tag, "extractor"), compile=False)
        random = metrics.get("weights") == "random"
        record = {"random": random, "sha256": metrics.get("weights_sha256"), "source": f"registered model {tag}",
                  "description": (f"RANDOM (registered model {tag} was trained on random weights)" if random else
                                  f"ImageNet, registered model {tag} (weights sha256 "
                                  f"{str(metrics.get('weights_sha256'))[:16]})")}
        return extractor, get_spec(card["backbone"]), record
    spec = get_spec("vgg16")
    try:
        info = weights_mod.load_info(spec.name)
    except WeightsError as exc:
        if not random_weights:
            raise
        print(f"no verified ImageNet weights ({exc}); --random-weights: RANDOM weights, for throughput only: the "
              "features and their agreement mean nothing about the served model", file=sys.stderr)
        record = {"random": True, "sha256": None, "source": "random (--random-weights)",
                  "description": "RANDOM (--random-weights: throughput only, the features mean nothing)"}
        return build_extractor(spec.name, weights=None), spec, record
    record = {"random": False, "sha256": info.sha256, "source": info.source, "checks": info.checks,
              "release": info.release,
              "description": f"ImageNet, verified ({info.release}; weights sha256 {info.sha256[:16]})"}
    return build_extractor(spec.name), spec, record


def export(extractor, spec, weights_record: dict, out: Path, images: np.ndarray, phantom_seed: int,
           max_mib: float = DEFAULT_MAX_MIB) -> dict:
    """Write the bundle for `extractor` into `out` and return its manifest; refuses above `max_mib`."""
    import keras
    import tensorflow as tf

    if extractor.dtype_policy.name != "float32":
        raise ValueError(f"export the float32 extractor, not a {extractor.dtype_policy.name} one")
    ops, weights, outputs = describe(extractor, spec)
    features = extractor.predict_on_batch(images)
    reference = {"images": images, **{f"features.{name}": np.asarray(features[name], np.float32) for name in outputs}}
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / WEIGHTS_FILE, **weights)  # uncompressed: float32 weights deflate by a few percent only
    np.savez(out / REFERENCE_FILE, **reference)
    files = {name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
             for name in (WEIGHTS_FILE, REFERENCE_FILE)}
    total = sum(f["bytes"] for f in files.values())
    if total > max_mib * 2**20:
        for name in files:
            (out / name).unlink()
        raise ValueError(f"the export is {total / 2**20:.1f} MiB, over --max-mib {max_mib}: it would not travel")
    manifest = {
        "format": BUNDLE_FORMAT, "model": extractor.name, "backbone": spec.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": {"shape": [int(d) for d in images.shape[1:]], "layout": "NHWC", "range": "0..255",
                  "append_ones": True},
        "ops": ops, "outputs": outputs, "weights": weights_record,
        "parameters": int(sum(v.size for v in weights.values())),
        "reference": {"images": int(len(images)), "phantom_seed": phantom_seed, "decoded_by": "load_image",
                      "runtime": f"TensorFlow {tf.__version__} (Keras {keras.__version__}) on CPU, float32"},
        "files": files, "total_bytes": total,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.gpu_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--model", help="a registered model's tag: export its extractor (default: build one fresh)")
    parser.add_argument("--images", type=int, default=8, help="phantom images carried with their Keras features")
    parser.add_argument("--seed", type=int, default=7, help="the phantom set's seed")
    parser.add_argument("--random-weights", action="store_true",
                        help="without verified ImageNet weights, export random ones (throughput only; said so)")
    parser.add_argument("--max-mib", type=float, default=DEFAULT_MAX_MIB)
    args = parser.parse_args(argv)
    from osteoscreen.errors import WeightsError

    try:
        extractor, spec, record = load_extractor(args.model, args.random_weights)
    except WeightsError as exc:
        print(f"{exc}\nrefusing to export without verified ImageNet weights: run `make weights`, or pass "
              "--random-weights for a throughput-only export", file=sys.stderr)
        return 2
    manifest = export(extractor, spec, record, Path(args.out), phantom_inputs(args.images, args.seed), args.seed,
                      args.max_mib)
    sizes = ", ".join(f"{name} {f['bytes'] / 2**20:.2f} MiB" for name, f in manifest["files"].items())
    print(f"wrote {args.out}: {manifest['total_bytes'] / 2**20:.2f} MiB ({sizes}); {manifest['parameters']:,} "
          f"parameters in {sum(op['op'] == 'conv' for op in manifest['ops'])} convolutions, float32; outputs "
          f"{', '.join(manifest['outputs'])}; {manifest['reference']['images']} phantom images with Keras float32 "
          f"features; weights: {record['description']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU machine's benchmark, proven here on the CPU before anyone spends GPU time: the pure-PyTorch extractor
(`loadtest/gpu_torch.py`) gives the Keras extractor's float32 features from the exported bundle (a wrong layout,
kernel transpose or pooling would not), the export refuses what it must, and the device script runs end to end
without TensorFlow, Keras or `osteoscreen` importable, as on that machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from loadtest import gpu_bundle, gpu_export, gpu_torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# float32 on the CPU differs from Keras by summation order only: measured 1e-7..1e-6 relative L2 per image
# (ImageNet weights, 8 phantom images, every output). The bound leaves room for other CPUs and cuDNN.
FLOAT32_REL_TOLERANCE = 1e-5


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)).max())


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """A bundle of the full extractor (all 13 convolutions, every output) with random weights and two phantom
    images: the layout is what is checked here, which random kernels test as well as ImageNet ones."""
    from osteoscreen.model.backbones import build_extractor
    from osteoscreen.model.specs import get_spec

    out = tmp_path_factory.mktemp("gpu_bundle")
    record = {"random": True, "sha256": None, "source": "test", "description": "RANDOM (test)"}
    gpu_export.export(build_extractor("vgg16", weights=None), get_spec("vgg16"), record, out,
                      gpu_export.phantom_inputs(2, seed=3), phantom_seed=3)
    return out


def test_torch_float32_equals_keras_float32(bundle_dir):
    bundle = gpu_bundle.load_bundle(bundle_dir)
    assert bundle.images.shape == (2, 224, 224, 1) and bundle.images.max() > 200  # real model input, 0..255
    assert [op["name"] for op in bundle.manifest["ops"]][-1] == "block5_pool"
    with torch.inference_mode():
        got = gpu_torch.GrayExtractor(bundle.manifest, bundle.weights).eval()(torch.from_numpy(bundle.images))
    assert sorted(got) == sorted(bundle.reference) == [f"block{b}_{p}" for b in (3, 4, 5) for p in ("avg", "max")]
    for name, ref in bundle.reference.items():
        assert got[name].dtype == torch.float32 and tuple(got[name].shape) == ref.shape
        assert np.abs(ref).max() > 0  # a dead network would agree with anything
        assert rel_l2(ref, got[name].numpy()) <= FLOAT32_REL_TOLERANCE, name


def test_a_wrong_kernel_layout_is_caught(bundle_dir):
    """The control for the test above: kernels with height and width swapped (a wrong transpose) give features
    far outside its tolerance, so its passing means the layout is right."""
    bundle = gpu_bundle.load_bundle(bundle_dir)
    swapped = {k: (v.transpose(1, 0, 2, 3) if k.endswith(".kernel") else v) for k, v in bundle.weights.items()}
    with torch.inference_mode():
        got = gpu_torch.GrayExtractor(bundle.manifest, swapped)(torch.from_numpy(bundle.images))
    assert min(rel_l2(ref, got[name].numpy()) for name, ref in bundle.reference.items()) > 100 * FLOAT32_REL_TOLERANCE


def test_bfloat16_keeps_the_first_conv_and_pooling_in_float32(bundle_dir):
    bundle = gpu_bundle.load_bundle(bundle_dir)
    model = gpu_torch.GrayExtractor(bundle.manifest, bundle.weights, "bfloat16")
    assert model.block1_conv1_weight.dtype == torch.float32 and model.block1_conv2_weight.dtype == torch.bfloat16
    with torch.inference_mode():
        got = model(torch.from_numpy(bundle.images))
    errors = {name: rel_l2(ref, got[name].numpy()) for name, ref in bundle.reference.items()}
    assert all(got[name].dtype == torch.float32 for name in got)
    assert 1e-4 < max(errors.values()) <= gpu_torch.AGREEMENT_BOUNDS["bfloat16"], errors  # really bfloat16


def test_a_tampered_bundle_is_refused(bundle_dir, tmp_path):
    for name in (gpu_bundle.WEIGHTS_FILE, gpu_bundle.REFERENCE_FILE):
        (tmp_path / name).symlink_to(bundle_dir / name)
    manifest = json.loads((bundle_dir / gpu_bundle.MANIFEST_FILE).read_text())
    manifest["files"][gpu_bundle.WEIGHTS_FILE]["sha256"] = "0" * 64
    (tmp_path / gpu_bundle.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="sha256"):
        gpu_bundle.load_bundle(tmp_path)


def test_export_refuses_without_verified_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
    assert gpu_export.main(["--out", str(tmp_path / "out")]) == 2
    assert "--random-weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_refuses_what_would_not_travel(bundle_dir, tmp_path):
    from osteoscreen.model.backbones import build_extractor
    from osteoscreen.model.specs import get_spec

    record = {"random": True, "sha256": None, "source": "test", "description": "RANDOM (test)"}
    small = build_extractor("vgg16", weights=None, features=["block3_avg"])
    with pytest.raises(ValueError, match="would not travel"):
        gpu_export.export(small, get_spec("vgg16"), record, tmp_path, np.zeros((1, 224, 224, 1), np.float32), 0,
                          max_mib=0.5)
    assert not list(tmp_path.glob("*.npz"))


def test_a_cut_extractor_exports_only_the_layers_its_features_need():
    from osteoscreen.model.backbones import build_extractor
    from osteoscreen.model.specs import get_spec

    ops, weights, outputs = gpu_export.describe(build_extractor("vgg16", weights=None, features=["block3_avg"]),
                                                get_spec("vgg16"))
    assert ops[-1]["name"] == "block3_pool" and outputs == {"block3_avg": {"layer": "block3_pool", "pool": "avg"}}
    assert sorted(weights) == sorted(f"{op['name']}.{part}" for op in ops if op["op"] == "conv"
                                     for part in ("kernel", "bias"))


def test_the_device_script_needs_a_gpu_unless_smoke(bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_torch.main(["--bundle", str(bundle_dir), "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "gpu_torch.json").exists()


# Run as on the GPU machine: TensorFlow, Keras, BentoML and the project's packages made unimportable.
_AS_ON_THE_DEVICE = """
import runpy, sys
for name in ("tensorflow", "keras", "bentoml", "osteoscreen", "training"):
    sys.modules[name] = None
sys.argv = ["gpu_torch"] + sys.argv[1:]
runpy.run_module("loadtest.gpu_torch", run_name="__main__")
"""


def test_the_device_script_runs_end_to_end_without_tensorflow(bundle_dir, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", _AS_ON_THE_DEVICE, "--bundle", str(bundle_dir), "--out",
                             str(tmp_path), "--smoke", "--batches", "1"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_torch.json").read_text())
    assert report["environment"]["device"] == "cpu" and report["smoke"] and report["random_weights"]
    rows = {(r["variant"], r["precision"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {(v, p, b) for v in ("nchw", "channels_last", "host") for p in ("float32", "bfloat16")
                         for b in (1,)}
    assert all(r["images_per_s"] > 0 and r["median_ms"] > 0 for r in rows.values())
    agreement = {(a["variant"], a["precision"]): a for a in report["agreement"]}
    assert agreement[("nchw", "float32")]["worst_rel_l2"] <= FLOAT32_REL_TOLERANCE
    assert agreement[("channels_last", "float32")]["worst_rel_l2"] <= FLOAT32_REL_TOLERANCE
    assert all(a["within_bound"] for a in agreement.values())
    markdown = (tmp_path / "gpu_torch.md").read_text()
    assert "| nchw | bfloat16 | 1 |" in markdown and "RANDOM" in markdown


@pytest.mark.slow
def test_imagenet_export_agrees_in_float32_and_bfloat16(use_keras_home, tmp_path, capsys):
    """The real export (`make bench-gpu-torch`): verified ImageNet weights, every candidate feature, under the size
    that travels. Measured on 8 phantom images: float32 at most 9.1e-7 relative L2, bfloat16 0.15-0.44%."""
    assert gpu_export.main(["--out", str(tmp_path), "--images", "4"]) == 0
    assert "ImageNet, verified" in capsys.readouterr().out
    bundle = gpu_bundle.load_bundle(tmp_path)
    assert not bundle.manifest["weights"]["random"] and len(bundle.manifest["weights"]["sha256"]) == 64
    assert bundle.manifest["total_bytes"] <= gpu_export.DEFAULT_MAX_MIB * 2**20
    x = torch.from_numpy(bundle.images)
    with torch.inference_mode():
        f32 = gpu_torch.GrayExtractor(bundle.manifest, bundle.weights)(x)
        bf16 = gpu_torch.GrayExtractor(bundle.manifest, bundle.weights, "bfloat16")(x)
    for name, ref in bundle.reference.items():
        assert rel_l2(ref, f32[name].numpy()) <= FLOAT32_REL_TOLERANCE, name
        assert rel_l2(ref, bf16[name].numpy()) <= gpu_torch.AGREEMENT_BOUNDS["bfloat16"], name


_EXPORT_REGISTERED = """
import sys
from osteoscreen.model import bundle
from osteoscreen.model.backbones import build_extractor
from loadtest import gpu_export
features = ["block3_avg", "block4_max"]
tag = bundle.register(bundle.ModelBundle(extractor=build_extractor("vgg16", weights=None, features=features),
                                         classifier=None, features=features, threshold=0.5, backbone="vgg16",
                                         metadata={"metrics": {"weights": "random", "weights_sha256": None}}))
sys.exit(gpu_export.main(["--model", tag, "--out", sys.argv[1], "--images", "2"]))
"""


@pytest.mark.slow
def test_a_registered_model_exports_its_own_extractor(tmp_path):
    """`--model TAG`: the bundle's extractor as stored (its features only, cut after block4), in a fresh process
    (BentoML reads BENTOML_HOME once per process)."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    result = subprocess.run([sys.executable, "-c", _EXPORT_REGISTERED, str(tmp_path / "out")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM (registered model osteoscreen:" in result.stdout
    bundle = gpu_bundle.load_bundle(tmp_path / "out")
    assert list(bundle.manifest["outputs"]) == ["block3_avg", "block4_max"]
    assert bundle.manifest["ops"][-1]["name"] == "block4_pool"
    with torch.inference_mode():
        got = gpu_torch.GrayExtractor(bundle.manifest, bundle.weights)(torch.from_numpy(bundle.images))
    assert all(rel_l2(ref, got[name].numpy()) <= FLOAT32_REL_TOLERANCE for name, ref in bundle.reference.items())

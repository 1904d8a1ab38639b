"""The one-channel backbones equal their three-channel originals on replicated gray input."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from osteoscreen.model import backbones
from osteoscreen.errors import WeightsError
from osteoscreen.model.specs import get_spec


def _reference_features(reference: keras.Model, spec, gray: np.ndarray) -> dict[str, np.ndarray]:
    """Features the textbook way: gray -> 3 channels -> the network's own preprocessing -> layer -> pool."""
    rgb = np.repeat(gray, 3, axis=-1)
    pre = rgb * np.asarray(spec.scale, np.float32) + np.asarray(spec.offset, np.float32)
    taps = keras.Model(reference.inputs, [reference.get_layer(name).output for name in spec.feature_layers.values()])
    maps = taps.predict(pre, verbose=0)
    out = {}
    for short, fmap in zip(spec.feature_layers, maps):
        out[f"{short}_avg"], out[f"{short}_max"] = fmap.mean(axis=(1, 2)), fmap.max(axis=(1, 2))
    return out


@pytest.mark.parametrize("name,layout", [("vgg16", "keras"), ("resnet50", "keras"), ("inceptionv3", "keras"),
                                         ("inceptionv3", "google2015")])
def test_folded_grayscale_model_equals_three_channel_model(name, layout):
    """InceptionV3 in both layouts: Keras's, and the 2015 graph's that its offline weights come in (x/127.5 - 1)."""
    spec = get_spec(name)
    keras.utils.set_random_seed(1)
    reference = backbones.reference_model(name, weights=None, layout=layout)
    assert backbones.layout_of(reference) == layout
    extractor = backbones.extractor_from(reference, spec)
    assert extractor.input_shape == (None, 224, 224, 1)
    rng = np.random.default_rng(0)
    gray = rng.uniform(0, 255, (2, 224, 224, 1)).astype(np.float32)
    gray[1, :40] = 0.0  # a dark band touching the border, where a folded bias alone would be wrong
    got = extractor.predict(gray, verbose=0)
    want = _reference_features(reference, spec, gray)
    assert sorted(got) == sorted(backbones.candidate_features(spec))
    for key, value in want.items():
        scale = float(np.abs(value).max()) or 1.0
        np.testing.assert_allclose(got[key], value, atol=1e-4 * scale, rtol=1e-4, err_msg=key)


def test_folding_is_not_trivially_equal_with_a_wrong_offset():
    """The equality above is a real check: dropping the folded offset channel changes the features."""
    spec = get_spec("vgg16")
    reference = backbones.reference_model("vgg16", weights=None)
    wrong = type(spec)(**{**spec.__dict__, "offset": (0.0, 0.0, 0.0)})
    gray = np.random.default_rng(0).uniform(0, 255, (1, 224, 224, 1)).astype(np.float32)
    got = backbones.extractor_from(reference, wrong).predict(gray, verbose=0)["block5_avg"]
    want = _reference_features(reference, spec, gray)["block5_avg"]
    assert not np.allclose(got, want, atol=1e-3 * float(np.abs(want).max()))


def test_imagenet_vgg16_extractor_loads_verified_weights(use_keras_home):
    extractor = backbones.build_extractor("vgg16")
    ref = backbones.reference_model("vgg16")
    assert float(ref.get_layer("block1_conv1").get_weights()[1][0]) == pytest.approx(0.734298, abs=1e-6)
    feats = extractor.predict(np.full((1, 224, 224, 1), 128.0, np.float32), verbose=0)
    assert feats["block5_avg"].shape == (1, 512)


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "inceptionv3"])
def test_building_without_pretrained_weights_refuses(name, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match=f"osteoscreen weights --backbone {name}"):
        backbones.build_extractor(name)


def test_the_2015_layout_exists_for_inceptionv3_only():
    with pytest.raises(ValueError, match="does not exist for vgg16"):
        backbones.application(get_spec("vgg16"), layout="google2015")


def test_unknown_weights_value_is_rejected():
    with pytest.raises(ValueError, match="explicit opt-in"):
        backbones.reference_model("vgg16", weights="random")

"""Grayscale ImageNet feature extractors.

Radiographs are single-channel, ImageNet networks take three. Replicating the gray channel three
times wastes nothing but is not what the seed did: it adapted the network to one input channel. We do
that exactly, by folding each network's own preprocessing into its first convolution:

    conv(K, [g*s_c + o_c]_c) = conv(sum_c K_c*s_c, g) + conv(sum_c K_c*o_c, 1)

The second term is a convolution of a constant-one image. Computing it as a second input channel of
ones (`AppendOnes`) keeps the equality exact even at the zero-padded border, where a folded bias
alone would be off. So the one-channel model takes raw 0..255 intensities and gives the same
features as the three-channel model on replicated, preprocessed input (`tests/test_backbones.py`).

Features are globally pooled (average and max) outputs of a few layers per network; which ones the
Random Forest uses is chosen by validation during training (`specs.BackboneSpec.feature_layers`).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from osteoscreen.model import inception_fid
from osteoscreen.model import weights as weights_mod
from osteoscreen.model.specs import POOLINGS, BackboneSpec, get_spec
from osteoscreen.types import INPUT_SIZE

IMAGENET = "imagenet"


@keras.saving.register_keras_serializable(package="osteoscreen")
class AppendOnes(keras.layers.Layer):
    """Appends a constant-one channel: carries the folded preprocessing offset through the first conv."""

    def call(self, inputs):
        return keras.ops.concatenate([inputs, keras.ops.ones_like(inputs)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 2 * input_shape[-1])


LAYOUTS = ("keras", inception_fid.LAYOUT)


def application(spec: BackboneSpec, channels: int = 3, layout: str = "keras") -> keras.Model:
    """The no-top network with random weights: Keras's application, or for InceptionV3 weights from Google's
    2015 release the 2015 graph's layout (its last block max-pools), which those weights were trained in."""
    if layout not in LAYOUTS or (layout == inception_fid.LAYOUT and spec.name != "inceptionv3"):
        raise ValueError(f"layout {layout!r} does not exist for {spec.name}")
    if layout == inception_fid.LAYOUT:
        return inception_fid.build((INPUT_SIZE, INPUT_SIZE, channels))
    return getattr(keras.applications, spec.keras_app)(
        weights=None, include_top=False, input_shape=(INPUT_SIZE, INPUT_SIZE, channels)
    )


def layout_of(model: keras.Model) -> str:
    return inception_fid.LAYOUT if model.name == inception_fid.MODEL_NAME else "keras"


def reference_model(backbone: str, weights: str | None = IMAGENET, layout: str = "keras") -> keras.Model:
    """The unmodified three-channel network (no top), with verified ImageNet weights.

    The layout the weights were provisioned for is taken from their JSON (`layout` only shapes a random
    model). `weights=None` gives random weights, which must be asked for explicitly: never a silent fallback.
    """
    spec = get_spec(backbone)
    if weights not in (IMAGENET, None):
        raise ValueError(f"weights must be {IMAGENET!r} or None (random, explicit opt-in), not {weights!r}")
    info = weights_mod.load_info(backbone) if weights == IMAGENET else None  # raises WeightsError if missing/tampered
    model = application(spec, 3, info.layout if info else layout)
    if info is not None:
        model.load_weights(info.path)
    return model


def fold_first_conv(reference: keras.Model, spec: BackboneSpec) -> keras.Model:
    """A copy of `reference` whose input is [gray, ones], preprocessing folded into the first conv."""
    with warnings.catch_warnings():  # Keras warns about the unusual channel count; it is intended here
        warnings.simplefilter("ignore", UserWarning)
        two_channel = application(spec, 2, layout_of(reference))
    folded_first = False
    for ref_layer, layer in zip(reference.layers, two_channel.layers, strict=True):
        w = ref_layer.get_weights()
        if not w:
            continue
        if not folded_first:  # the first layer with weights is the first convolution in every backbone
            kernel = w[0].astype(np.float64)  # (h, w, 3, out), input channels in the network's own order
            scale = np.asarray(spec.scale, dtype=np.float64)[None, None, :, None]
            offset = np.asarray(spec.offset, dtype=np.float64)[None, None, :, None]
            folded = np.stack([(kernel * scale).sum(axis=2), (kernel * offset).sum(axis=2)], axis=2)
            w = [folded.astype(np.float32), *w[1:]]
            folded_first = True
        layer.set_weights(w)  # same architecture, same layer order: Inception's layer names are not stable
    return two_channel


def candidate_features(spec: BackboneSpec) -> list[str]:
    """Every feature set an extractor emits: `<layer>_<pooling>` for each feature layer and pooling."""
    return [f"{short}_{pool}" for short in spec.feature_layers for pool in POOLINGS]


def extractor_from(reference: keras.Model, spec: BackboneSpec, features: list[str] | None = None) -> keras.Model:
    """One-channel extractor built on `reference`'s weights: (N, 224, 224, 1) 0..255 -> {name: (N, C)}.

    `features` (default: every candidate) limits the outputs; the network is cut after the deepest
    layer they need, so serving a block4 feature does not pay for block5.
    """
    wanted = features or candidate_features(spec)
    unknown = sorted(set(wanted) - set(candidate_features(spec)))
    if unknown:
        raise ValueError(f"unknown features {unknown} for {spec.name}; choose from {candidate_features(spec)}")
    layers = [short for short in spec.feature_layers if any(f.startswith(f"{short}_") for f in wanted)]
    trunk = fold_first_conv(reference, spec)
    taps = keras.Model(trunk.inputs, [trunk.get_layer(spec.feature_layers[short]).output for short in layers])
    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 1), name="gray")
    maps = taps(AppendOnes(name="append_ones")(inputs))
    maps = maps if isinstance(maps, (list, tuple)) else [maps]
    pools = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}
    outputs = {}
    for short, fmap in zip(layers, maps):
        for pool, layer_cls in pools.items():
            if f"{short}_{pool}" in wanted:
                outputs[f"{short}_{pool}"] = layer_cls(name=f"{short}_{pool}")(fmap)
    return keras.Model(inputs, outputs, name=f"{spec.name}_gray_extractor")


def build_extractor(backbone: str = "vgg16", weights: str | None = IMAGENET, features: list[str] | None = None,
                    precision: str = "float32") -> keras.Model:
    """The extractor training and serving use. Raises WeightsError when ImageNet weights are not
    provisioned; `weights=None` opts into random ones (tests and ablations only)."""
    return with_precision(extractor_from(reference_model(backbone, weights), get_spec(backbone), features), precision)


_MIXED = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def with_precision(extractor: keras.Model, precision: str) -> keras.Model:
    """`extractor` computing its convolutions in `precision`; same weights, float32 in and out.

    Under Keras's `mixed_bfloat16` policy the variables stay float32 and each layer casts them and its input
    to bfloat16. Kept in float32, for accuracy at almost no cost: the first convolution (it carries the folded
    preprocessing, offsets of ~-100 per channel whose sum partly cancels, over two input channels only) and
    the global pooling layers (averaging 14x14 bfloat16 values would lose bits the Random Forest splits on;
    they cast the last feature map up). So the features always leave as float32. The saved bundle holds the
    float32 model; this is applied on load.
    """
    if precision not in _MIXED:
        raise ValueError(f"precision must be one of {', '.join(_MIXED)}, not {precision!r}")
    if precision == "float32":
        return extractor
    config = extractor.get_config()
    first_conv = [True]

    def retype(layers: list[dict], nested: bool) -> None:
        for layer in layers:
            inner = layer.get("config", {})
            if "layers" in inner:
                retype(inner["layers"], nested=True)
                continue
            if not nested or not isinstance(inner.get("dtype"), dict):
                continue  # outer layers: input, AppendOnes, pooling stay float32
            if layer.get("class_name") == "Conv2D" and first_conv[0]:
                first_conv[0] = False
                continue
            inner["dtype"] = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": _MIXED[precision]},
                              "registered_name": None}

    retype(config["layers"], nested=False)
    converted = keras.Model.from_config(config, custom_objects={"AppendOnes": AppendOnes})
    converted.set_weights(extractor.get_weights())
    return converted


__all__ = ["AppendOnes", "IMAGENET", "application", "build_extractor", "layout_of", "candidate_features", "extractor_from", "fold_first_conv", "reference_model",
           "with_precision"]

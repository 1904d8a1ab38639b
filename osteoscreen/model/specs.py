"""What each supported backbone is, without importing TensorFlow.

A backbone is a Keras application used as a frozen feature extractor. Its preprocessing is written
here as a per-channel affine map (x * scale + offset on the 0..255 input, channel order as the network
expects), so `backbones.py` can fold it into the first convolution of a one-channel model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    keras_app: str  # attribute of keras.applications
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]
    feature_layers: dict[str, str]  # short name -> Keras layer whose pooled output is a candidate feature
    default_features: tuple[str, ...]  # candidate features used unless validation picks others
    keras_weights_file: str  # Keras's own cache file name for the no-top ImageNet weights


_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

SPECS: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec(
        name="vgg16",
        keras_app="VGG16",
        scale=(1.0, 1.0, 1.0),
        offset=tuple(-m for m in _CAFFE_MEAN_BGR),
        feature_layers={"block3": "block3_pool", "block4": "block4_pool", "block5": "block5_pool"},
        default_features=("block5_avg",),
        keras_weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "resnet50": BackboneSpec(
        name="resnet50",
        keras_app="ResNet50",
        scale=(1.0, 1.0, 1.0),
        offset=tuple(-m for m in _CAFFE_MEAN_BGR),
        feature_layers={"stage3": "conv3_block4_out", "stage4": "conv4_block6_out", "stage5": "conv5_block3_out"},
        default_features=("stage5_avg",),
        keras_weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "inceptionv3": BackboneSpec(
        name="inceptionv3",
        keras_app="InceptionV3",
        scale=(1 / 127.5,) * 3,
        offset=(-1.0,) * 3,
        feature_layers={"mixed5": "mixed5", "mixed7": "mixed7", "mixed10": "mixed10"},
        default_features=("mixed10_avg",),
        keras_weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
}

BACKBONE_NAMES = tuple(SPECS)
DEFAULT_BACKBONE = "vgg16"
POOLINGS = ("avg", "max")


def get_spec(name: str) -> BackboneSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}") from None

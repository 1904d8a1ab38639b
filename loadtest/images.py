"""The images a load test or benchmark sends: phantom radiographs (PNG, JPEG copies) and pydicom-data's real
DICOM radiographs, drawn by format weights ("png=6,jpeg=3,dicom=1"). Imports neither TensorFlow nor locust, so
the Locust process and the benchmarks share it."""

from __future__ import annotations

import io
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MIX = "png=6,jpeg=3,dicom=1"
# Real radiographs from pydicom-data: CR chest (RG1, 1955x1841) and tibia (RG3, 1760x1760), uncompressed and
# JPEG 2000. RG1_J2KR takes ~0.8 s to decode on one core here, so DICOM is a small share of the default mix.
DICOM_FILES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm", "RG3_J2KI.dcm")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom"}
MiB = 1024 * 1024


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    format: str  # png | jpeg | dicom

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


@dataclass
class ImageMix:
    """Encoded images by format, and the weights to draw formats with."""

    by_format: dict[str, list[Sample]]
    weights: dict[str, float]
    source: str = ""

    def pick(self, rng: random.Random) -> Sample:
        formats = [f for f in self.weights if self.weights[f] > 0 and self.by_format.get(f)]
        fmt = rng.choices(formats, [self.weights[f] for f in formats])[0]
        return rng.choice(self.by_format[fmt])

    def all(self) -> list[Sample]:
        return [s for f in self.weights if self.weights[f] > 0 for s in self.by_format.get(f, [])]

    def describe(self) -> str:
        parts = [f"{f}: {len(self.by_format.get(f, []))} files x weight {w:g}" for f, w in self.weights.items()]
        return f"{self.source}; " + ", ".join(parts)


def parse_mix(text: str) -> dict[str, float]:
    """"png=6,jpeg=3,dicom=1" -> {"png": 6.0, ...}; unknown formats and bad numbers are errors."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip().lower()
        if name not in CONTENT_TYPES:
            raise ValueError(f"unknown format {name!r} in mix {text!r}; use png, jpeg, dicom")
        try:
            weights[name] = float(value or 1)
        except ValueError:
            raise ValueError(f"bad weight {value!r} for {name} in mix {text!r}") from None
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"mix {text!r} gives no format a positive weight")
    return weights


def _format_of(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if data[128:132] == b"DICM":
        return "dicom"
    return None


def _png_to_jpeg(data: bytes) -> bytes:
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:  # 16-bit phantoms: keep the top 8 bits
        pixels = (pixels.astype(np.uint32) >> 8).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert("L").save(out, "JPEG", quality=90)
    return out.getvalue()


def _real_dicoms(limit_bytes: int) -> list[Sample]:
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return []
    samples = []
    for name in DICOM_FILES:
        try:
            path = get_testdata_file(name)
        except Exception:  # noqa: BLE001 - pydicom-data missing or a file not shipped: use what there is
            path = None
        if path and os.path.getsize(path) <= limit_bytes:
            samples.append(Sample(name, Path(path).read_bytes(), "dicom"))
    return samples


def build_mix(data_dir: str | os.PathLike | None = None, mix: str = DEFAULT_MIX, n_phantoms: int = 8,
              seed: int = 0, max_files: int = 64, max_bytes: int = 16 * MiB) -> ImageMix:
    """The images a load test or benchmark sends.

    With `data_dir`: every PNG/JPEG/DICOM file under it (by content, up to `max_files`). Without: `n_phantoms`
    phantom spine radiographs (`training.phantom`, 8- and 16-bit PNG) plus 8-bit JPEG copies of them, and the
    real DICOM radiographs pydicom-data ships. JPEGs are also derived from PNGs when a folder has none."""
    weights = parse_mix(mix)
    by_format: dict[str, list[Sample]] = {f: [] for f in CONTENT_TYPES}
    if data_dir:
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if sum(map(len, by_format.values())) >= max_files:
                break
            if path.stat().st_size > max_bytes:
                continue
            data = path.read_bytes()
            fmt = _format_of(data)
            if fmt:
                by_format[fmt].append(Sample(str(path.relative_to(root)), data, fmt))
        source = f"folder {root}"
    else:
        from training.phantom import generate_dataset

        with tempfile.TemporaryDirectory(prefix="osteoscreen-mix-") as tmp:
            os.environ.setdefault("TQDM_DISABLE", "1")
            generate_dataset(Path(tmp) / "set", n_phantoms, seed=seed)
            for path in sorted((Path(tmp) / "set").rglob("*.png")):
                by_format["png"].append(Sample(f"phantom/{path.parent.name}/{path.name}", path.read_bytes(), "png"))
        source = f"{len(by_format['png'])} phantom radiographs (seed {seed})"
    if weights.get("jpeg", 0) > 0 and not by_format["jpeg"]:
        by_format["jpeg"] = [Sample(s.name.rsplit(".", 1)[0] + ".jpg", _png_to_jpeg(s.data), "jpeg")
                             for s in by_format["png"]]
    if weights.get("dicom", 0) > 0 and not by_format["dicom"]:
        by_format["dicom"] = _real_dicoms(max_bytes)
        source += " + pydicom-data radiographs" if by_format["dicom"] else ""
    missing = [f for f, w in weights.items() if w > 0 and not by_format[f]]
    if len(missing) == sum(1 for w in weights.values() if w > 0):
        raise ValueError(f"no images for any format of the mix {mix!r} ({source})")
    return ImageMix(by_format, {f: w for f, w in weights.items() if by_format[f]}, source)


def lumbar_lateral_dicom(png: bytes, header: bytes | None = None, age: str = "065Y") -> bytes:
    """A phantom radiograph as a modality would send a lateral lumbar film: a real CR header (pydicom-data's RG3
    unless `header` is given) retagged LSPINE, LL, an adult age, in a study, series and instance of its own, with
    the phantom's pixels (16-bit MONOCHROME2). What the DICOM node screens in its tests and its benchmark."""
    import numpy as np
    import pydicom
    from PIL import Image

    if header is None:
        from pydicom.data import get_testdata_file

        header = Path(get_testdata_file("RG3_UNCR.dcm")).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(header))
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientAge = "LSPINE", "LL", age
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    for keyword in ("WindowCenter", "WindowWidth"):  # the header's window is for its own pixels
        if keyword in ds:
            delattr(ds, keyword)
    image = Image.open(io.BytesIO(png))
    if image.mode in ("I;16", "I;16B", "I"):  # a 16-bit phantom: its own values (convert("L") would clip them)
        gray = np.asarray(image, dtype=np.uint16)
    else:
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    ds.set_pixel_data(gray, photometric_interpretation="MONOCHROME2", bits_stored=16)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()

"""The one path from uploaded bytes to a validated model input, shared by training and serving.

    bytes --decode--> Decoded: 2-D float32 in [0, 1], native resolution (a large JPEG 2000 DICOM: a reduced
                      wavelet level, >= 448 px a side), bone bright; and a DICOM file's header
          --to_model_input--> float32 (224, 224, 1), intensities 0..255

The server keeps the `Decoded` (its header feeds the intended-use checks and the SR); `load_image` does both
steps for callers that need only the model input. Every way the bytes can be unusable ends in an
`ImageDecodeError` whose message can go back to a remote client verbatim (HTTP 400 / gRPC
INVALID_ARGUMENT); the underlying exception is chained (`raise ... from`) for the server's logs.

Formats: PNG and JPEG (Pillow) and DICOM (`osteoscreen.imaging.dicom`, pydicom). The format is read from the
content (magic bytes), never from a file name; a caller's format hint is only checked against it.
Sizes are checked from the header before any pixel is decoded, so a small file that claims to be a
gigapixel image costs nothing.

No TensorFlow here: this module must import quickly in clients, tests and data tools.
"""

from __future__ import annotations

import io
import math
import zlib

from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from osteoscreen import settings
from osteoscreen.imaging.dicom import decode_dicom, jpeg_frame_header
from osteoscreen.errors import ImageDecodeError
from osteoscreen.imaging.limits import check_dimensions
from osteoscreen.types import INPUT_SIZE

__all__ = [
    "Decoded",
    "FORMATS",
    "MAX_BYTES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "decode",
    "decode_image",
    "detect_format",
    "load_image",
    "to_model_input",
]


# From the settings at import (a bad value stops start-up); read at call time as module globals, so tests can
# patch them. The default pixel limit, ~7000x7000, admits any real radiograph.
MAX_PIXELS: int = settings.current().max_pixels
MAX_BYTES: int = settings.current().max_bytes
MIN_SIDE = 32  # smaller than this is a thumbnail or an icon, not a radiograph we can screen

FORMATS = ("png", "jpeg", "dicom")

# Standardisation: this percentile range of the (resized) image maps to 0..255.
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
# Below this spread (in [0, 1] units, ~1/40 of an 8-bit grey level) the image is blank.
MIN_CONTRAST = 1e-4

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_HINT_ALIASES: dict[str, str | None] = {
    "png": "png",
    "image/png": "png",
    "jpeg": "jpeg",
    "jpg": "jpeg",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "dicom": "dicom",
    "dcm": "dicom",
    "application/dicom": "dicom",
    "application/octet-stream": None,  # a generic Content-Type says nothing
}
# Recognised only to say precisely what we do not accept.
_OTHER_SIGNATURES = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"BM", "BMP"),
    (b"%PDF", "PDF"),
    (b"\x1f\x8b", "gzip"),
    (b"PK\x03\x04", "ZIP"),
)


# -- public API --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    """One uploaded file, parsed once: its pixels and, for DICOM, its header (the dataset without pixel data),
    which the intended-use checks, the result and the SR builder read instead of parsing the bytes again."""

    pixels: np.ndarray  # 2-D float32 in [0, 1], bone bright
    format: str  # png | jpeg | dicom
    header: Dataset | None = None  # DICOM only


def load_image(data: bytes, format_hint: str | None = None, size: int = INPUT_SIZE) -> np.ndarray:
    """Bytes of a PNG, JPEG or DICOM radiograph -> model input, float32 (size, size, 1) in 0..255."""
    return to_model_input(decode_image(data, format_hint), size)


def decode_image(data: bytes, format_hint: str | None = None) -> np.ndarray:
    """The pixels of `decode`, for callers that need no header (training, tools)."""
    return decode(data, format_hint).pixels


def decode(data: bytes, format_hint: str | None = None) -> Decoded:
    """Decode an uploaded image to a 2-D float32 array in [0, 1] at its native resolution (a large JPEG 2000
    DICOM at a reduced one, `osteoscreen.imaging.jpeg2000`), displayed as a radiologist would see it (bone bright).

    `format_hint` ("png", "jpeg", "dicom", a MIME type, or None) is advisory: the content decides,
    and a hint the content contradicts is an error rather than something to guess around. The one
    thing a hint enables is DICOM without the 128-byte preamble, which has no reliable magic bytes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"image data must be bytes, not {type(data).__name__}")
    n_bytes = memoryview(data).nbytes
    if n_bytes == 0:
        raise ImageDecodeError("the image is empty (0 bytes)")
    if n_bytes > MAX_BYTES:
        raise ImageDecodeError(f"the file is too large ({n_bytes} bytes; the limit is {MAX_BYTES} bytes)")
    if not isinstance(data, bytes):
        data = bytes(data)

    hint = _normalise_hint(format_hint)
    detected = detect_format(data)
    if detected is None:
        if hint == "dicom":  # no preamble: let pydicom try, then validate like any DICOM
            pixels, header = decode_dicom(data, max_pixels=MAX_PIXELS, min_side=MIN_SIDE, max_bytes=MAX_BYTES,
                                          force=True)
            return Decoded(pixels, "dicom", header)
        raise ImageDecodeError(
            "unsupported or unrecognised image format; send PNG, JPEG or DICOM"
            + (f" (the content is not {hint.upper()})" if hint else "")
        )
    if detected not in FORMATS:
        raise ImageDecodeError(f"unsupported image format {detected}; send PNG, JPEG or DICOM")
    if hint is not None and hint != detected:
        raise ImageDecodeError(
            f"the format hint says {hint.upper()} but the content is {detected.upper()}"
        )
    if detected == "dicom":
        pixels, header = decode_dicom(data, max_pixels=MAX_PIXELS, min_side=MIN_SIDE, max_bytes=MAX_BYTES)
        return Decoded(pixels, "dicom", header)
    return Decoded(_decode_pillow(data, detected), detected)


def to_model_input(gray: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """A decoded 2-D image (any real range; decode_image gives [0, 1]) -> float32 (size, size, 1)
    with intensities 0..255, what the grayscale backbone expects.

    Resize: stretched to size x size, ignoring the aspect ratio. The seed trained that way, so the
    Random Forest learned from stretched anatomy; letterboxing or cropping would show the model
    something it never saw. Pillow's resize of a float ("F") image with a bilinear (triangle) filter
    widens its support by the shrink factor, i.e. it averages every source pixel (antialiasing) rather
    than sampling every ninth one as nearest-neighbour or TF's non-antialiased resize would, which
    would alias fine trabecular texture into noise. Bilinear also never overshoots (unlike bicubic or
    Lanczos), so the values stay within the input range.

    Standardise: the 0.5th..99.5th percentile of the resized image maps linearly to 0..255, clipped.
    A 16-bit and an 8-bit export, or a dark and a bright exposure, of the same film then give the same
    input; the 0.5% tails let burned-in labels, collimator edges and dead pixels saturate instead of
    squeezing the anatomy into a few grey levels (a plain min-max would). Percentiles are taken after
    resizing: cheaper, and they describe exactly the pixels the model sees.
    """
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {gray.shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    small = _resize(gray, size)
    low, high = np.percentile(small, (LOW_PERCENTILE, HIGH_PERCENTILE))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ImageDecodeError("the image contains invalid (non-finite) pixel values")
    if high - low < MIN_CONTRAST:
        raise ImageDecodeError("the image has no contrast (it is blank or a single grey level)")
    small -= np.float32(low)
    small *= np.float32(255.0 / (high - low))
    np.clip(small, 0.0, 255.0, out=small)
    return small.reshape(size, size, 1)


def detect_format(data: bytes) -> str | None:
    """'png', 'jpeg' or 'dicom' from the magic bytes; another format's name (e.g. 'GIF') if we know
    it only to reject it; None if unknown (which may still be DICOM without a preamble)."""
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(_JPEG_SIGNATURE):
        return "jpeg"
    if data[128:132] == b"DICM":
        return "dicom"
    if data[8:12] == b"WEBP" and data.startswith(b"RIFF"):
        return "WebP"
    for signature, name in _OTHER_SIGNATURES:
        if data.startswith(signature):
            return name
    return None


# -- helpers -------------------------------------------------------------------------------------------


def _normalise_hint(format_hint: str | None) -> str | None:
    """'png' | 'jpeg' | 'dicom' | None from a format name or a Content-Type (parameters ignored)."""
    if format_hint is None:
        return None
    key = format_hint.split(";", 1)[0].strip().lower()
    if not key:
        return None
    if key not in _HINT_ALIASES:
        raise ImageDecodeError(f"unknown format hint {format_hint[:40]!r}; use one of {', '.join(FORMATS)}")
    return _HINT_ALIASES[key]


def _resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear stretch to size x size on a 32-bit float Pillow image; returns a new
    writable float32 array (the input is never modified)."""
    src = np.ascontiguousarray(gray, dtype=np.float32)
    resized = Image.fromarray(src).resize((size, size), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.float32)


# -- PNG and JPEG ----------------------------------------------------------------------------------------

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # "I": 16-bit PNG, older Pillow
_RGB_MODES = frozenset({"RGB", "RGBA", "RGBX"})
_OTHER_COLOR_MODES = frozenset({"P", "PA", "CMYK", "YCbCr"})  # via RGB


def _decode_pillow(data: bytes, fmt: str) -> np.ndarray:
    """PNG or JPEG -> 2-D float32 in [0, 1]. Sizes are checked from our own header parse before
    Pillow sees the bytes; Pillow then must decode every pixel (truncation is an error, never padded)."""
    width, height = _png_size(data) if fmt == "png" else _jpeg_size(data)
    # Pillow's own bomb limit also applies; checking it here keeps its warning/error from firing.
    limit = min(MAX_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_PIXELS)
    check_dimensions(width, height, max_pixels=limit, min_side=MIN_SIDE)
    label = fmt.upper()
    try:
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]]) as img:
            if img.size != (width, height):
                raise ImageDecodeError(f"the {label} header is inconsistent (corrupt file)")
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise ImageDecodeError(
                    f"multi-frame (animated) {label} is not supported ({frames} frames); send a single image"
                )
            img.load()
            orientation = _exif_orientation(img)
            gray = _pillow_to_unit(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"the {label} image exceeds the decoder's pixel limit") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... on bad data
        raise ImageDecodeError(f"the {label} image is truncated or corrupt") from exc
    return _apply_orientation(gray, orientation)


def _pillow_to_unit(img: Image.Image) -> np.ndarray:
    """A loaded Pillow image -> 2-D float32 in [0, 1]: 16-bit over 65535, 8-bit over 255, colour as
    ITU-R 601 luminance (Pillow's "L" conversion), alpha ignored."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _scaled(np.asarray(img), 65535.0)
    if mode == "L":
        return _scaled(np.asarray(img), 255.0)
    if mode == "LA":
        return _scaled(np.asarray(img.getchannel("L")), 255.0)
    if mode == "1":
        return np.asarray(img, dtype=np.float32)
    if mode in _RGB_MODES:
        return _scaled(np.asarray(img.convert("L")), 255.0)
    if mode in _OTHER_COLOR_MODES:
        return _scaled(np.asarray(img.convert("RGB").convert("L")), 255.0)
    raise ImageDecodeError(f"unsupported pixel format {mode!r} in the image")


def _scaled(pixels: np.ndarray, full_scale: float) -> np.ndarray:
    gray = pixels.astype(np.float32)  # the one copy out of Pillow's dtype
    gray *= np.float32(1.0 / full_scale)
    np.clip(gray, 0.0, 1.0, out=gray)
    return gray


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag (1..8); absent or invalid means 1, as in every viewer."""
    value = img.getexif().get(0x0112, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _apply_orientation(gray: np.ndarray, orientation: int) -> np.ndarray:
    """Honour the EXIF Orientation tag (phone photos of films carry one) as numpy views, no copy.
    Same result as PIL.ImageOps.exif_transpose."""
    if orientation == 2:
        return gray[:, ::-1]
    if orientation == 3:
        return gray[::-1, ::-1]
    if orientation == 4:
        return gray[::-1, :]
    if orientation == 5:
        return gray.T
    if orientation == 6:
        return np.rot90(gray, -1)
    if orientation == 7:
        return gray[::-1, ::-1].T
    if orientation == 8:
        return np.rot90(gray, 1)
    return gray


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from IHDR, after walking every chunk to IEND and verifying its CRC.

    Pillow does not check IDAT CRCs, so corruption inside the compressed data can decode into
    silently wrong pixels; the CRC walk (zlib.crc32, ~1 ms/MB, no copies) catches it, and a missing
    IEND means truncation.
    """
    view = memoryview(data)
    pos, end_of_data = len(_PNG_SIGNATURE), len(data)
    size: tuple[int, int] | None = None
    while True:
        if pos + 12 > end_of_data:
            raise ImageDecodeError("the PNG image is truncated")
        length = int.from_bytes(view[pos : pos + 4], "big")
        chunk_type = bytes(view[pos + 4 : pos + 8])
        chunk_end = pos + 12 + length
        if length > 0x7FFFFFFF or chunk_end > end_of_data:
            raise ImageDecodeError("the PNG image is truncated")
        if zlib.crc32(view[pos + 4 : chunk_end - 4]) != int.from_bytes(view[chunk_end - 4 : chunk_end], "big"):
            raise ImageDecodeError("the PNG image is corrupt (checksum mismatch)")
        if size is None:
            if chunk_type != b"IHDR" or length != 13:
                raise ImageDecodeError("the PNG image is corrupt (no IHDR header)")
            size = (int.from_bytes(view[pos + 8 : pos + 12], "big"), int.from_bytes(view[pos + 12 : pos + 16], "big"))
        elif chunk_type == b"IEND":
            return size
        pos = chunk_end


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height from the (single) JPEG frame header, before Pillow sees the bytes."""
    try:
        marker, precision, width, height = jpeg_frame_header(data)
    except ValueError as exc:
        reason = str(exc)
        raise ImageDecodeError(
            "the JPEG image is truncated" if reason == "truncated" else f"the JPEG image is corrupt ({reason})"
        ) from None
    _check_jpeg_process(marker, precision)
    return width, height


def _check_jpeg_process(marker: int, precision: int) -> None:
    """Pillow (libjpeg, 8-bit build) decodes 8-bit lossy JPEG only; say so instead of 'corrupt'."""
    if marker == 0xF7:
        raise ImageDecodeError("JPEG-LS is not supported as a plain file; send PNG or DICOM")
    if marker in (0xC3, 0xC7, 0xCB, 0xCF):
        raise ImageDecodeError("lossless JPEG is not supported as a plain file; send PNG or DICOM")
    if precision != 8:
        raise ImageDecodeError(f"{precision}-bit JPEG is not supported as a plain file; send PNG or DICOM")

"""DICOM bytes -> 2-D float32 image in [0, 1], display convention (bone bright).

The DICOM half of `osteoscreen.imaging.decode`: that module sniffs the format, enforces the byte limit and
calls `decode_dicom`. Everything a DICOM file can get wrong is turned into an `ImageDecodeError`
whose message is safe to show a remote client; the original exception is chained for the logs.

Order of operations (DICOM PS3.4 N.2, the grayscale pipeline a viewer applies):
1. check the header (pixel data present, one frame, supported photometric interpretation, sane
   dimensions, a decoder for the transfer syntax, a JPEG / JPEG 2000 codestream whose own size
   matches Rows x Columns, a deflated dataset that inflates within the byte limit) *before* any
   pixel data is decoded, so a decompression bomb costs nothing;
2. decode the stored values (pydicom 3 with the pylibjpeg plugins for compressed syntaxes; a large
   grayscale JPEG 2000 frame at a reduced resolution level instead, `osteoscreen.imaging.jpeg2000`);
3. modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence);
4. VOI LUT or window (the first one, which DICOM makes the default); without one, the min..max of
   the modality values (a linear rescale with a linear window, the common case, is one float32
   multiply-add for 3-5 together: `_linear_window`);
5. normalise to [0, 1] over the VOI output range, then invert MONOCHROME1 so bone is bright.
Colour images (RGB, YBR_*) skip 3-4 (those modules do not apply to colour) and become luminance.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from osteoscreen.errors import ImageDecodeError
from osteoscreen.imaging import jpeg2000
from osteoscreen.imaging.limits import check_dimensions

__all__ = [
    "COLOR_INTERPRETATIONS",
    "MONOCHROME_INTERPRETATIONS",
    "decode_dicom",
    "decoder_plugins",
    "jpeg_frame_header",
]

log = logging.getLogger(__name__)

MONOCHROME_INTERPRETATIONS = frozenset({"MONOCHROME1", "MONOCHROME2"})
# pydicom's pixel_array already returns RGB for the YBR family (as_rgb=True), so all are one case.
COLOR_INTERPRETATIONS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})

# ITU-R BT.601 luma, the weights Pillow uses for mode "L": a colour DICOM and a colour PNG of the
# same picture must give the same grayscale.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def decode_dicom(
    data: bytes, *, max_pixels: int, min_side: int, max_bytes: int, force: bool = False
) -> tuple[np.ndarray, Dataset]:
    """Decode one DICOM image to a 2-D float32 array in [0, 1], bone bright, and its header: the dataset
    without its pixel data, which the intended-use checks and the DICOM results read, so that a request's
    bytes are parsed once (and its stored pixels not held while it waits for the model).

    `force=True` reads a dataset without the 128-byte preamble and 'DICM' prefix; the caller only
    sets it when the client said the bytes are DICOM, and the header checks below still apply.
    `max_bytes` also bounds a deflated dataset once inflated (pydicom inflates it whole on read).
    """
    _check_deflated_size(data, max_bytes)
    ds = _read_dataset(data, force=force)
    if force and "PixelData" not in ds:
        # pydicom will "parse" any bytes when forced; without an image in them it was not DICOM.
        raise ImageDecodeError("the content is not a DICOM image (no DICOM preamble and no pixel data)")
    pixels = _decode_image(ds, max_pixels=max_pixels, min_side=min_side)
    del ds.PixelData  # also drops pydicom's cached array
    return pixels, ds


def _decode_image(ds: Dataset, *, max_pixels: int, min_side: int) -> np.ndarray:
    photometric = _check_header(ds, max_pixels=max_pixels, min_side=min_side)
    # A large JPEG 2000 film is decoded at the resolution the model needs, not the scanner's; None: in full.
    reduced = jpeg2000.decode_reduced(ds) if photometric in MONOCHROME_INTERPRETATIONS else None
    if reduced is not None:
        return reduced.align(_monochrome_to_unit(reduced.pixels, ds, invert=photometric == "MONOCHROME1"))
    pixels = _decode_pixels(ds)
    if photometric in COLOR_INTERPRETATIONS:
        return _color_to_unit(pixels, ds)
    return _monochrome_to_unit(pixels, ds, invert=photometric == "MONOCHROME1")


def decoder_plugins() -> dict[str, tuple[str, ...]]:
    """Transfer syntax name -> pydicom decoding plugins usable in this environment.

    For start-up logs and health checks: a syntax with an empty tuple cannot be decoded here
    (video, JPEG 2000 Part 2, JPIP, ...); uncompressed syntaxes show ("pydicom",).
    """
    plugins: dict[str, tuple[str, ...]] = {}
    for uid in AllTransferSyntaxes:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:  # video and deflate-image syntaxes pydicom has no decoder for
            plugins[UID(uid).name] = ()
        else:
            available = tuple(decoder.available_plugins) if decoder.is_available else ()
            # Native (uncompressed) syntaxes need no plugin: pydicom reads them itself.
            plugins[UID(uid).name] = available or (("pydicom",) if decoder.is_available else ())
    return plugins


# -- reading and header checks ----------------------------------------------------------------------


def _read_dataset(data: bytes, *, force: bool) -> Dataset:
    """Parse the DICOM header and keep the (still encoded) pixel data; nothing is decoded yet."""
    try:
        return pydicom.dcmread(io.BytesIO(data), force=force)
    except InvalidDicomError as exc:
        raise ImageDecodeError("the file is not a valid DICOM file") from exc
    except MemoryError:
        raise
    except Exception as exc:  # pydicom's parser raises many types on malformed input
        raise ImageDecodeError("the DICOM file is truncated or corrupt: its header could not be read") from exc


def _check_header(ds: Dataset, *, max_pixels: int, min_side: int) -> str:
    """Reject what we cannot or should not decode, from the header alone. Returns the photometric
    interpretation (upper case)."""
    try:
        return _check_header_fields(ds, max_pixels=max_pixels, min_side=min_side)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # a header value that cannot be converted to its VR
        raise ImageDecodeError("the DICOM header is corrupt: an image attribute has an invalid value") from exc


def _check_header_fields(ds: Dataset, *, max_pixels: int, min_side: int) -> str:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ImageDecodeError("DICOM float pixel data is not supported; send an integer-valued image")
        raise ImageDecodeError(
            "the DICOM file has no pixel data (it may be a report or other non-image object, or truncated)"
        )

    frames = _int_attr(ds, "NumberOfFrames", default=1)
    if frames > 1:
        raise ImageDecodeError(
            f"multi-frame DICOM is not supported ({frames} frames); send a single radiograph per file"
        )

    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if not photometric:
        raise ImageDecodeError("the DICOM file has no Photometric Interpretation; cannot tell how to display it")
    if photometric == "PALETTE COLOR":
        raise ImageDecodeError(
            "DICOM photometric interpretation PALETTE COLOR (pseudo-colour) is not supported; "
            "send the grayscale radiograph"
        )
    if photometric not in MONOCHROME_INTERPRETATIONS | COLOR_INTERPRETATIONS:
        raise ImageDecodeError(
            f"DICOM photometric interpretation {photometric!r} is not supported; expected MONOCHROME1, "
            "MONOCHROME2, RGB or YBR_FULL/YBR_FULL_422/YBR_ICT/YBR_RCT"
        )

    samples = _int_attr(ds, "SamplesPerPixel", default=1)
    expected_samples = 1 if photometric in MONOCHROME_INTERPRETATIONS else 3
    if samples != expected_samples:
        raise ImageDecodeError(
            f"the DICOM header is inconsistent: {photometric} needs {expected_samples} sample(s) per pixel, "
            f"the file says {samples}"
        )

    rows, cols = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    check_dimensions(cols, rows, max_pixels=max_pixels, min_side=min_side)
    for name in ("BitsAllocated", "BitsStored"):
        if _int_attr(ds, name, default=0) <= 0:
            raise ImageDecodeError(f"the DICOM header has no valid {name}")

    _ensure_decoder(ds)
    return photometric


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An integer header attribute; empty or missing falls back to `default` or is an error."""
    value: Any = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise ImageDecodeError(f"the DICOM header has no {keyword}")
        return default
    return int(value)


def _ensure_decoder(ds: Dataset) -> None:
    """Make sure pixel_array will find a decoder, so a missing plugin is a clear message, not a
    traceback. A dataset read without file meta gets the transfer syntax pydicom parsed it with,
    which is only meaningful for native (uncompressed) pixel data."""
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is None:  # pragma: no cover - dcmread always returns a FileDataset with file_meta
        file_meta = ds.file_meta = FileMetaDataset()
    tsyntax = file_meta.get("TransferSyntaxUID")
    if tsyntax is None:
        tsyntax = file_meta.TransferSyntaxUID = _native_syntax_from_parse(ds)

    tsyntax = UID(tsyntax)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise ImageDecodeError(
            f"DICOM transfer syntax {tsyntax.name!r} is not supported; "
            "send uncompressed, RLE, JPEG, JPEG-LS or JPEG 2000 encoded images"
        ) from exc
    if not decoder.is_available:
        log.error("no pydicom plugin can decode %s: %s", tsyntax.name, decoder.missing_dependencies)
        raise ImageDecodeError(f"DICOM transfer syntax {tsyntax.name!r} cannot be decoded by this server")
    _check_codestream_size(ds, tsyntax)


def _native_syntax_from_parse(ds: Dataset) -> UID:
    """The uncompressed transfer syntax pydicom inferred while parsing a dataset without file meta."""
    if ds["PixelData"].is_undefined_length:
        raise ImageDecodeError(
            "the DICOM file has compressed pixel data but no transfer syntax (file meta information)"
        )
    implicit_vr, little_endian = ds.original_encoding
    if little_endian is None or implicit_vr is None:
        raise ImageDecodeError("the DICOM file has no transfer syntax and its encoding cannot be determined")
    if implicit_vr:
        if not little_endian:
            raise ImageDecodeError("the DICOM file uses implicit VR big endian, which is not a valid encoding")
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian


# -- decompression bombs inside DICOM ------------------------------------------------------------------

_SNIFF_BYTES = 65536  # the JPEG / JPEG 2000 main header is at the start of the codestream


def _check_codestream_size(ds: Dataset, tsyntax: UID) -> None:
    """A JPEG or JPEG 2000 codestream carries its own dimensions, and the codec allocates for those,
    not for Rows x Columns (pydicom compares only after decoding). A 100x100 header around a tiny
    60000x60000 codestream would otherwise be a decompression bomb."""
    if tsyntax in JPEG2000TransferSyntaxes:
        reader = _j2k_size
    elif tsyntax in JPEGTransferSyntaxes or tsyntax in JPEGLSTransferSyntaxes:
        reader = _jpeg_codestream_size
    else:  # native: length-checked by pydicom; RLE: its decoder allocates Rows x Columns
        return
    head = _codestream_head(ds)
    try:
        width, height = reader(head)
    except ValueError as exc:
        raise ImageDecodeError(f"the DICOM {tsyntax.name} pixel data is corrupt ({exc})") from exc
    if (width, height) != (int(ds.Columns), int(ds.Rows)):
        raise ImageDecodeError(
            f"the DICOM pixel data is corrupt: the {tsyntax.name} codestream is {width}x{height} "
            f"but the header says {int(ds.Columns)}x{int(ds.Rows)}"
        )


def _codestream_head(ds: Dataset) -> bytes:
    """The first bytes of the frame's codestream (fragments after the Basic Offset Table)."""
    head = bytearray()
    try:
        fragments = generate_fragments(ds.PixelData)
        next(fragments, None)  # the Basic Offset Table item
        for fragment in fragments:
            head += fragment[: _SNIFF_BYTES - len(head)]
            if len(head) >= _SNIFF_BYTES:
                break
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageDecodeError("the DICOM encapsulated pixel data is corrupt") from exc
    return bytes(head)


def _j2k_size(head: bytes) -> tuple[int, int]:
    """Image size from the SIZ segment that follows SOC (some writers wrap it in a JP2 box)."""
    start = head.find(b"\xff\x4f\xff\x51")
    if start < 0 or start + 24 > len(head):
        raise ValueError("no JPEG 2000 size header")
    xsiz, ysiz, x_offset, y_offset = struct.unpack_from(">IIII", head, start + 8)
    if x_offset >= xsiz or y_offset >= ysiz:
        raise ValueError("invalid JPEG 2000 size header")
    return xsiz - x_offset, ysiz - y_offset


def _jpeg_codestream_size(head: bytes) -> tuple[int, int]:
    if not head.startswith(b"\xff\xd8"):
        raise ValueError("no JPEG start of image")
    _, _, width, height = jpeg_frame_header(head)
    return width, height


# SOF0..SOF15 less DHT (C4), JPG (C8), DAC (CC); plus SOF55 (F7), JPEG-LS.
JPEG_SOF_MARKERS = (frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}) | {0xF7}


def jpeg_frame_header(data: bytes) -> tuple[int, int, int, int]:
    """(SOF marker, sample precision, width, height) of a JPEG or JPEG-LS codestream starting with
    SOI, walking the marker segments up to the first scan. Also used for plain JPEG files by
    `osteoscreen.imaging.decode`. Exactly one frame header is allowed: a second one could make the decoder
    allocate for a size nobody checked. Raises ValueError('truncated' | a reason) otherwise."""
    pos, end_of_data = 2, len(data)
    frame: tuple[int, int, int, int] | None = None
    while pos + 4 <= end_of_data:
        if data[pos] != 0xFF:
            raise ValueError("bad marker")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            pos += 2
            continue
        if marker == 0xDA and frame is not None:  # start of scan: the header is complete
            return frame
        if marker in (0xD9, 0xDA):  # end of image / a scan before any frame header
            raise ValueError("no frame header")
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            raise ValueError("bad segment length")
        if marker in JPEG_SOF_MARKERS:
            if frame is not None:
                raise ValueError("several frame headers")
            if pos + 9 > end_of_data:
                break
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            frame = (marker, data[pos + 4], width, height)
        pos += 2 + length
    raise ValueError("truncated")


def _check_deflated_size(data: bytes, max_bytes: int) -> None:
    """pydicom inflates a Deflated Explicit VR Little Endian dataset in one zlib call on read, so
    a few MB could become many GB. Inflate once with a bound first (rare syntax; cost is fine)."""
    meta_end, tsyntax = _file_meta_transfer_syntax(data)
    if tsyntax != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(memoryview(data)[meta_end:], max_bytes + 1)
    except zlib.error as exc:
        raise ImageDecodeError("the deflated DICOM dataset is corrupt") from exc
    if len(inflated) > max_bytes:
        raise ImageDecodeError(
            f"the deflated DICOM dataset is too large once inflated (over {max_bytes} bytes)"
        )


def _file_meta_transfer_syntax(data: bytes) -> tuple[int, str | None]:
    """(end offset of the file meta group, its Transfer Syntax UID) read straight from the bytes:
    the group is always explicit VR little endian, and reading it with pydicom would inflate a
    deflated dataset before we could look."""
    pos = 132 if data[128:132] == b"DICM" else 0
    tsyntax: str | None = None
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if pos + 12 > len(data):
                break
            length, value_pos = struct.unpack_from("<I", data, pos + 8)[0], pos + 12
        else:
            length, value_pos = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
        if element == 0x0010:
            tsyntax = data[value_pos : value_pos + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = value_pos + length
    return pos, tsyntax


# -- pixels ----------------------------------------------------------------------------------------------


def _decode_pixels(ds: Dataset) -> np.ndarray:
    """Decode the stored values (YBR arrives as RGB). Failures here mean bad bytes, not a bug."""
    name = UID(ds.file_meta.TransferSyntaxUID).name
    try:
        pixels = ds.pixel_array
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageDecodeError(
            f"could not decode the DICOM pixel data ({name}): the data is truncated, corrupt or "
            "inconsistent with the image header"
        ) from exc
    rows, cols = int(ds.Rows), int(ds.Columns)
    expected = (rows, cols) if int(ds.get("SamplesPerPixel") or 1) == 1 else (rows, cols, 3)
    if pixels.shape != expected:
        raise ImageDecodeError(
            f"the DICOM pixel data has shape {pixels.shape}, but the header describes {expected}"
        )
    return pixels


def _monochrome_to_unit(pixels: np.ndarray, ds: Dataset, *, invert: bool) -> np.ndarray:
    """Modality LUT, VOI, normalise, invert MONOCHROME1: stored values -> what a viewer shows."""
    try:
        affine = _linear_window(ds)
        if affine is None:
            values = apply_modality_lut(pixels, ds)
            display, black, white = _apply_voi(values, ds)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # malformed LUT descriptors, zero window widths, unknown VOI functions...
        raise ImageDecodeError("the DICOM modality or VOI LUT (window) is invalid") from exc

    _warn_on_presentation_conflict(ds, invert)
    if affine is not None:
        return _affine_to_unit(pixels, *affine, invert=invert)
    gray = _normalise(display, black, white)
    if invert:
        np.subtract(1.0, gray, out=gray)
    return gray


def _apply_voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float, float]:
    """Apply the default VOI transform; return it with the output values meaning black and white.

    Uses pydicom's apply_voi / apply_windowing, with its rule that a VOI LUT Sequence wins over a
    window when both are present. The black/white levels are the transform's own output range (so a
    window keeps its meaning: values below it are black), not the range of this image's data.
    """
    if _has_voi_lut(ds):
        if not np.issubdtype(values.dtype, np.integer):
            # A LUT is indexed by integer modality values; rescale gives floats of integral value.
            values = np.rint(values).astype(np.int64)
        item = ds.VOILUTSequence[0]
        entries = int(item.LUTDescriptor[0]) or 65536
        first = int(item.LUTDescriptor[1])
        table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds)
        return apply_voi(values, ds), float(table.min()), float(table.max())
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # Everything below the window maps to the black level, everything above to white.
        ends = apply_windowing(np.array([-np.inf, np.inf]), ds)
        return apply_windowing(values, ds), float(ends[0]), float(ends[1])
    return values, float(values.min()), float(values.max())


def _linear_window(ds: Dataset) -> tuple[float, float] | None:
    """(scale, offset) with which stored value v is shown as clip(v * scale + offset, 0, 1), when the
    rescale and the window are both linear (the usual CR/DX/CT header); None sends the image through
    pydicom's general path (LUT sequences, SIGMOID, degenerate values).

    Why: pydicom's apply_windowing works in float64 with boolean masks and fancy indexing, ~24 ms of CPU
    for a 3.6-megapixel film (more than the rest of the decode together); rescale, window and the
    normalisation to [0, 1] collapse into one multiply-add on float32, ~6 ms. The result equals pydicom's
    up to float32 rounding (tests/test_imaging.py compares the two over rescales, signs and window kinds):
    PS3.3 C.11.2.1.2.1 maps x <= c - 0.5 - (w - 1) / 2 to black, x > c - 0.5 + (w - 1) / 2 to white and
    linearly between, which is clip((x - (c - 0.5)) / (w - 1) + 0.5) on [0, 1] (LINEAR_EXACT: c and w
    as they are)."""
    if _has_voi_lut(ds) or ds.get("ModalityLUTSequence"):
        return None
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    center = float(center[0] if isinstance(center, (list, tuple, MultiValue)) else center)
    width = float(width[0] if isinstance(width, (list, tuple, MultiValue)) else width)
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
    elif function != "LINEAR_EXACT":
        return None
    slope, intercept = 1.0, 0.0
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:  # pydicom's rule: both, or neither applies
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    if not (width > 0 and slope != 0 and all(map(np.isfinite, (center, width, slope, intercept)))):
        return None  # a step window, a flat rescale, or nonsense: pydicom's path decides (or refuses)
    low = center - width / 2
    return slope / width, (intercept - low) / width


def _affine_to_unit(pixels: np.ndarray, scale: float, offset: float, *, invert: bool) -> np.ndarray:
    """clip(pixels * scale + offset, 0, 1) as float32 in place after one copy; MONOCHROME1's 1 - x folded in."""
    if invert:
        scale, offset = -scale, 1.0 - offset
    gray = pixels.astype(np.float32)
    gray *= np.float32(scale)
    gray += np.float32(offset)
    np.clip(gray, 0.0, 1.0, out=gray)
    return gray


def _has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None


def _warn_on_presentation_conflict(ds: Dataset, invert: bool) -> None:
    """Photometric Interpretation decides the inversion; a contradicting Presentation LUT Shape
    (DICOM pairs INVERSE with MONOCHROME1) is logged rather than silently obeyed or ignored."""
    shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
    if shape and (shape == "INVERSE") != invert:
        log.warning(
            "Presentation LUT Shape %s contradicts Photometric Interpretation %s; following the latter",
            shape,
            ds.PhotometricInterpretation,
        )


def _normalise(values: np.ndarray, black: float, white: float) -> np.ndarray:
    """Map black..white to 0..1 as float32 (one copy; in place after that). A degenerate range gives
    zeros: a blank image, which `imaging.to_model_input` rejects with a clear message."""
    gray = values.astype(np.float32, copy=True)
    span = white - black
    if not np.isfinite(span) or span == 0:
        gray.fill(0.0)
        return gray
    gray -= np.float32(black)
    gray *= np.float32(1.0 / span)
    np.clip(gray, 0.0, 1.0, out=gray)
    return gray


def _color_to_unit(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """RGB (or YBR decoded to RGB) -> luminance in [0, 1] over the stored bit depth."""
    bits = int(ds.BitsStored)
    gray = pixels.astype(np.float32) @ LUMA_WEIGHTS
    gray *= np.float32(1.0 / (2**bits - 1))
    np.clip(gray, 0.0, 1.0, out=gray)
    return gray

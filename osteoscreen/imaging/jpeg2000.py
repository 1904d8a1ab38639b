"""A JPEG 2000 DICOM frame decoded at reduced resolution: the wavelet levels the 224x224 model never sees
are skipped instead of being decoded and then averaged away.

Why: every image is stretched to 224x224 (`decode.to_model_input`), and JPEG 2000 decoding of a 2k CR film
is what limits a serving replica on real DICOM (pydicom-data's RG1, ~1955x1841: ~0.5 s of CPU per image).
A JPEG 2000 codestream is a wavelet pyramid: discarding r levels yields the image's low-pass at 1/2^r the
size, for a fraction of the work. OpenJPEG does that (`reduce`); pylibjpeg-openjpeg, pydicom's decoder,
does not expose it, Pillow's JPEG 2000 plugin (OpenJPEG inside its wheels) does.

Only the plain case is taken: single-frame grayscale (MONOCHROME1/2), a raw codestream (no JP2 box) with
one component and one tile (Pillow 13 decodes a tiled codestream wrongly at reduced resolution: the tiles
right of the first column come out wrong, tests/test_dicom_reduce.py), no image offset or subsampling, a
precision equal to Bits Stored and a signedness equal to Pixel Representation. The result has the dtype and
the meaning of pydicom's own stored values, so the modality LUT, VOI and MONOCHROME1 inversion in
`imaging.dicom` apply unchanged. Anything else, and any
failure of Pillow, returns None: the caller then runs the full decode, which decodes the file or raises
its usual clear error (a truncated codestream fails both ways). Never a guess.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, features
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import JPEG2000, JPEG2000Lossless, UID

from osteoscreen import settings

__all__ = ["ENV", "FLOOR", "Codestream", "Reduced", "decode_reduced", "decode_stored", "levels_to_discard",
           "read_main_header"]

log = logging.getLogger(__name__)

ENV = "OSTEOSCREEN_J2K_REDUCE"
# Both sides stay >= this after the reduction: 2x the 224 model input, so the antialiased resize in
# `to_model_input` still averages >= 2 source pixels per output pixel on each axis. Measured on RG1/RG3
# (README, "JPEG 2000 DICOM at reduced resolution"): at this floor the model input differs from the full
# decode's by <= 6.3 grey levels (mean <= 0.32) and the demo model's probability by <= 0.012; RG3 one level
# further (440 px) moved it by 0.029, over the 0.02 the bfloat16 gate allows; at ~1x the model input
# (220-245 px) the input moved by 12-52 grey levels.
FLOOR = 448
SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})  # 1.2.840.10008.1.2.4.90 / .91 (Part 1 only)

_SOC_SIZ = b"\xff\x4f\xff\x51"
_SOT, _COD, _COC = 0xFF90, 0xFF52, 0xFF53


# The `j2k_reduce` setting, as a module global read at each call: tests and tools may flip it.
ENABLED: bool = settings.current().j2k_reduce


@dataclass(frozen=True)
class Codestream:
    """What the JPEG 2000 main header (SIZ, COD, COC) says about component 0."""

    width: int
    height: int
    precision: int
    signed: bool
    components: int
    levels: int  # wavelet decomposition levels: at most this many can be discarded
    plain: bool  # no image offset, no subsampling
    tiles: int


def read_main_header(codestream: bytes) -> Codestream:
    """Parse SOC, SIZ and the main header's COD/COC markers up to the first tile (SOT).

    Raises ValueError for anything that is not a well-formed raw codestream. The decomposition levels come
    from COD, overridden for component 0 by a COC (ISO/IEC 15444-1 A.6.1-A.6.2)."""
    if not codestream.startswith(_SOC_SIZ) or len(codestream) < 6:
        raise ValueError("not a raw JPEG 2000 codestream (SOC, SIZ)")
    lsiz = struct.unpack_from(">H", codestream, 4)[0]
    if lsiz < 41 or len(codestream) < 4 + lsiz:
        raise ValueError("truncated SIZ segment")
    xsiz, ysiz, xo, yo, xt, yt, xto, yto = struct.unpack_from(">IIIIIIII", codestream, 8)
    components = struct.unpack_from(">H", codestream, 40)[0]
    if components < 1 or lsiz != 38 + 3 * components:
        raise ValueError("inconsistent SIZ segment")
    ssiz, xr, yr = codestream[42], codestream[43], codestream[44]
    if xo >= xsiz or yo >= ysiz or xt == 0 or yt == 0 or xto > xo or yto > yo:
        raise ValueError("invalid image or tile offset")

    levels: int | None = None
    component_levels: int | None = None
    pos = 2 + 2 + lsiz
    while True:
        if pos + 4 > len(codestream):
            raise ValueError("truncated main header")
        marker, length = struct.unpack_from(">HH", codestream, pos)
        if marker == _SOT:
            break
        if marker >> 8 != 0xFF or length < 2:
            raise ValueError("bad marker segment in the main header")
        if pos + 2 + length > len(codestream):
            raise ValueError("truncated main header")
        if marker == _COD and length >= 12:
            levels = codestream[pos + 4 + 1 + 4]  # Scod, SGcod (4 bytes), then SPcod's first byte
        elif marker == _COC and length >= 9:
            index_bytes = 1 if components < 257 else 2
            index = int.from_bytes(codestream[pos + 4 : pos + 4 + index_bytes], "big")
            if index == 0:
                component_levels = codestream[pos + 4 + index_bytes + 1]  # after Scoc
        pos += 2 + length
    if levels is None:
        raise ValueError("no COD segment")
    return Codestream(
        width=xsiz - xo,
        height=ysiz - yo,
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        components=components,
        levels=component_levels if component_levels is not None else levels,
        plain=xo == 0 and yo == 0 and xr == 1 and yr == 1,
        tiles=-(-(xsiz - xto) // xt) * -(-(ysiz - yto) // yt),
    )


def levels_to_discard(width: int, height: int, levels: int, floor: int = FLOOR) -> int:
    """The most wavelet levels r <= `levels` whose image (ceil(side / 2^r), as OpenJPEG sizes it) keeps
    both sides >= `floor`; 0 means decode at full resolution."""
    r = 0
    while r < levels and min(_reduced(width, r + 1), _reduced(height, r + 1)) >= floor:
        r += 1
    return r


@dataclass(frozen=True)
class Reduced:
    """Stored values decoded with `discard` wavelet levels dropped, from an image of `full_shape` (rows, cols)."""

    pixels: np.ndarray
    discard: int
    full_shape: tuple[int, int]

    def align(self, gray: np.ndarray) -> np.ndarray:
        """`gray` (these pixels after the modality/VOI LUTs) resampled so that its pixels tile the full image
        evenly, as every resize (`to_model_input`'s, the overlay's) assumes.

        Sample k of a level-r low-pass band is centred on full-resolution pixel 2^r k (OpenJPEG keeps the even
        samples at each level), while a resize takes reduced pixel k to cover full pixels 2^r k .. 2^r (k+1):
        uncorrected, the image shifts by (2^r - 1) / 2 full pixels (1.5 on RG1, ~0.17 model pixels), enough
        to move a collimator edge by a grey-level step of tens; and ceil-sized sides over-cover odd sizes.
        This one bilinear pass (about a millisecond at ~500 px) puts the samples where they belong: measured
        on RG1 at 2 levels, the model input's |difference| from the full decode falls from 27.9 to 3.0 grey
        levels at most, 1.35 to 0.11 on average."""
        scale = 1 << self.discard
        rows, cols = self.full_shape
        start = 0.5 - 0.5 / scale  # where the first full pixel's left edge falls, in reduced pixels
        height, width = gray.shape
        padded = np.pad(np.ascontiguousarray(gray, dtype=np.float32), ((0, 1), (0, 1)), mode="edge")
        box = (start, start, start + cols / scale, start + rows / scale)
        resampled = Image.fromarray(padded).resize((width, height), Image.Resampling.BILINEAR, box=box)
        return np.array(resampled, dtype=np.float32)


def decode_reduced(ds: Dataset, *, floor: int | None = None) -> Reduced | None:
    """The stored values of `ds`'s frame at reduced resolution, or None where the full decode must run.

    `ds` has passed `imaging.dicom`'s header checks (one frame, sane and bounded dimensions, codestream size
    equal to Rows x Columns), so nothing here allocates for an unchecked size."""
    if not ENABLED:
        return None
    try:
        reason = _ineligible(ds)
        if not reason:
            codestream = get_frame(ds.PixelData, 0, number_of_frames=1)
            header = read_main_header(codestream)
            reason = _unusual(header, ds)
    except MemoryError:
        raise
    except Exception as exc:  # odd header values, corrupt fragments: the full decode reports what is wrong
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        log.debug("JPEG 2000 decoded at full resolution: %s", reason)
        return None
    discard = levels_to_discard(header.width, header.height, header.levels, FLOOR if floor is None else floor)
    if discard == 0:
        return None
    try:
        pixels = decode_stored(codestream, header, discard, _stored_dtype(ds))
    except MemoryError:
        raise
    except Exception as exc:  # Pillow refused (or the data is corrupt): the full decode decides
        log.info("reduced JPEG 2000 decode failed, decoding at full resolution: %s: %s", type(exc).__name__, exc)
        return None
    return Reduced(pixels, discard, (header.height, header.width))


def decode_stored(codestream: bytes, header: Codestream, discard: int, dtype: np.dtype) -> np.ndarray:
    """Decode `codestream` with `discard` wavelet levels dropped (0: full size) to stored values of `dtype`.

    Pillow scales an N-bit component up to its 8- or 16-bit container and offsets signed values by 2^(N-1)
    (what pydicom's own Pillow plugin undoes, pydicom.pixels.decoders.pillow); this undoes both. Pillow's
    `reduce` setter sizes the image by rounding where OpenJPEG takes the ceiling (1841 / 4: Pillow 460,
    OpenJPEG 461, and the load fails), so the tile is given the size OpenJPEG will produce."""
    width, height = _reduced(header.width, discard), _reduced(header.height, discard)
    container = 16 if header.precision > 8 else 8
    with Image.open(io.BytesIO(codestream), formats=["JPEG2000"]) as img:
        expected_mode = "I;16" if container == 16 else "L"
        if img.mode != expected_mode or img.size != (header.width, header.height) or len(img.tile) != 1:
            raise ValueError(f"Pillow reads it as {img.mode} {img.size}, expected {expected_mode}")
        tile = img.tile[0]
        codec, _, layers, fd, length = tile.args
        img._size = (width, height)
        img.tile = [ImageFile._Tile(tile.codec_name, (0, 0, width, height), tile.offset,
                                    (codec, discard, layers, fd, length))]
        img.load()
        raw = np.asarray(img)
    if raw.shape != (height, width):
        raise ValueError(f"decoded {raw.shape}, expected {(height, width)}")
    values = raw.astype(np.int32) >> (container - header.precision)
    if header.signed:
        values -= 1 << (header.precision - 1)
    return values.astype(dtype)


def _reduced(side: int, discard: int) -> int:
    return -(-side // (1 << discard))


def _stored_dtype(ds: Dataset) -> np.dtype:
    """The dtype pydicom's pixel_array gives these stored values (Bits Allocated, Pixel Representation)."""
    return np.dtype(f"{'i' if int(ds.PixelRepresentation) else 'u'}{int(ds.BitsAllocated) // 8}")


def _ineligible(ds: Dataset) -> str:
    """Why the header rules the reduced decode out ('' if it does not)."""
    tsyntax = UID(ds.file_meta.get("TransferSyntaxUID") or "")
    if tsyntax not in SYNTAXES:
        return f"transfer syntax {tsyntax.name or 'none'}"
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or int(ds.get("SamplesPerPixel") or 1) != 1:
        return f"photometric interpretation {photometric}"
    if int(ds.get("NumberOfFrames") or 1) != 1:
        return "multi-frame"
    representation = ds.get("PixelRepresentation")
    if int(ds.BitsAllocated) not in (8, 16) or representation is None or int(representation) not in (0, 1):
        return f"bits allocated {ds.BitsAllocated}, pixel representation {representation}"
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        return "Pillow is set to accept truncated images"
    if not features.check_codec("jpg_2000"):
        return "this Pillow has no JPEG 2000 codec"
    return ""


def _unusual(header: Codestream, ds: Dataset) -> str:
    """Why the codestream rules it out ('' if it does not): only what the value mapping was verified on."""
    if header.components != 1 or not header.plain:
        return "several components, an image offset or subsampling"
    if header.tiles != 1:  # Pillow 13 decodes the tiles right of the first column wrongly at reduced resolution
        return f"{header.tiles} tiles"
    if (header.width, header.height) != (int(ds.Columns), int(ds.Rows)):
        return "codestream size differs from the header"
    if header.precision != int(ds.BitsStored) or header.precision > int(ds.BitsAllocated):
        return f"codestream precision {header.precision}, Bits Stored {ds.BitsStored}"
    if header.signed != bool(int(ds.PixelRepresentation)):
        return "codestream signedness differs from Pixel Representation"
    return ""

"""Image inputs shared by the tests: the ingestion tests (`tests/test_imaging.py`) and the serving
tests (`tests/test_service.py`, which send every bad input over HTTP and both gRPC APIs).

    from tests.inputs import BAD_INPUTS, real_radiograph, good_png, good_jpeg

`BAD_INPUTS` maps a case name to `(data, format_hint, words)`: `data` must be refused (by
`osteoscreen.imaging.decode.load_image(data, format_hint)`, and so by every serving API) with a short
message containing every one of `words` (all lower-case: compare with `message.lower()`).
`format_hint` is None or one of "png", "jpeg", "dicom". Every input is under 1 MB; the limits they
exceed are the server's defaults (MAX_PIXELS 50 Mpx, MAX_BYTES 64 MiB), not monkeypatched ones.
Cases whose point is a patched limit or a patched library (over MAX_BYTES, a missing decoder
plugin, "never handed to Pillow") stay tests of their own in test_imaging.py, built from the
helpers here.

The whole table is built at import in a few hundred milliseconds: the decompression bombs are
assembled from one repeated deflate block rather than by compressing tens of MB of zeros.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    MPEG2MPML,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "BAD_INPUTS",
    "BadInput",
    "PNG_SIGNATURE",
    "codestream_larger_than_header",
    "deflated_dicom_bomb",
    "dicom_bytes",
    "dicom_dataset",
    "good_jpeg",
    "good_png",
    "jpeg",
    "jpeg_with_frame_size",
    "picture",
    "png",
    "png_bomb",
    "png_chunk",
    "png_header_liar",
    "real_radiograph",
    "testdata",
    "to_u16",
    "to_u8",
]

BadInput = tuple[bytes, str | None, tuple[str, ...]]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# -- building blocks -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def testdata(name: str) -> bytes:
    """The bytes of one of pydicom's test files or of the pydicom-data package's (e.g. "RG3_UNCR.dcm")."""
    path = get_testdata_file(name)  # pydicom's own files plus the pydicom-data package
    assert path is not None, f"{name} not found: is pydicom-data installed?"
    with open(path, "rb") as fh:
        return fh.read()


def real_radiograph(name: str) -> bytes:
    """A real DICOM radiograph from pydicom-data (David Clunie's CR test images), by stem or file name:
    "RG1_UNCR" (chest PA, MONOCHROME1, 1841x1955, 7.2 MB), "RG1_J2KR" (the same, lossless JPEG 2000),
    "RG1_J2KI" (lossy JPEG 2000), "RG3_UNCR" (10-bit, 1760x1760, 6.2 MB), "RG3_J2KR" (832 KB)."""
    return testdata(name if name.endswith(".dcm") else f"{name}.dcm")


def retagged(name: str, **attributes: object) -> bytes:
    """A real radiograph (`real_radiograph(name)`) with header attributes set, or removed where None."""
    ds = pydicom.dcmread(io.BytesIO(real_radiograph(name)))
    for key, value in attributes.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def picture(height: int = 240, width: int = 200, seed: int | None = None) -> np.ndarray:
    """A deterministic radiograph-like picture in [0.05, 0.95]: soft background, a bright
    'vertebral column' of blocks, smooth gradients and fine texture. A seed varies the block
    brightness and adds a little noise, for several distinct valid images."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    img = 0.25 + 0.15 * np.sin(xx / width * np.pi) + 0.05 * (yy / height)
    rng = None if seed is None else np.random.default_rng(seed)
    for k in range(5):
        cy = (k + 0.75) * height / 5.5
        block = (np.abs(yy - cy) < height / 14) & (np.abs(xx - width / 2) < width / 6)
        img[block] += 0.35 + 0.04 * k - (0.0 if rng is None else rng.uniform(0.0, 0.25))
    img += 0.03 * np.sin(xx / 3.0) * np.cos(yy / 4.0)
    if rng is not None:
        img += rng.normal(0.0, 0.01, img.shape)
    return np.clip(img, 0.05, 0.95)


def to_u8(unit: np.ndarray) -> np.ndarray:
    return np.round(unit * 255).astype(np.uint8)


def to_u16(unit: np.ndarray) -> np.ndarray:
    return np.round(unit * 65535).astype(np.uint16)


def png(pixels: np.ndarray | Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    (pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)).save(buf, "PNG", **save)
    return buf.getvalue()


def jpeg(image: np.ndarray | Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, "JPEG", **save)
    return buf.getvalue()


def good_png(seed: int = 0) -> bytes:
    """A small valid 8-bit grayscale PNG radiograph-like image (200x240, ~40 KB); seeds differ."""
    return png(to_u8(picture(seed=seed)))


def good_jpeg(seed: int = 0) -> bytes:
    """A small valid grayscale JPEG radiograph-like image (200x240, quality 90); seeds differ."""
    return jpeg(to_u8(picture(seed=seed)), quality=90)


def dicom_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None) -> Dataset:
    """A minimal CR image dataset (explicit VR little endian) around `pixels`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    bits = bits_stored or pixels.dtype.itemsize * 8
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    return ds


def dicom_bytes(ds: Dataset, **write) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, **({"enforce_file_format": True} | write))
    return buf.getvalue()


def png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", zlib.crc32(chunk_type + payload))


def _deflate_then_zeros(prefix: bytes, n_zeros: int, chunk: int) -> bytes:
    """Raw deflate of `prefix + bytes(n_zeros)` without compressing n_zeros bytes: after a full
    flush the compressor starts afresh, so every flushed block of `chunk` zeros is the same bytes."""
    assert n_zeros % chunk == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return head + block * (n_zeros // chunk) + compressor.flush()


def png_bomb(width: int = 8000, height: int = 8000) -> bytes:
    """A valid all-black 8-bit grayscale PNG of width x height (64 Mpx by default) in ~64 KB."""
    n = (width + 1) * height  # a filter byte + the pixels, per row
    adler32 = ((n % 65521) << 16) | 1  # of n zero bytes
    rows_per_block = max((k for k in range(1, min(height, 1 << 20) + 1) if height % k == 0 and (width + 1) * k <= 1 << 20),
                         default=1)
    idat = b"\x78\xda" + _deflate_then_zeros(b"", n, (width + 1) * rows_per_block) + struct.pack(">I", adler32)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_header_liar(width: int = 30000, height: int = 30000) -> bytes:
    """A small 64x64 PNG whose (re-checksummed) IHDR claims width x height."""
    small = png(np.zeros((64, 64), np.uint8))
    return small[:8] + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + small[33:]


def jpeg_with_frame_size(width: int, height: int) -> bytes:
    """A baseline JPEG of `picture()` whose SOF0 header claims width x height."""
    data = bytearray(jpeg(to_u8(picture()), quality=80))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def deflated_dicom_bomb(rows: int = 6000, columns: int = 6000) -> bytes:
    """A Deflated Explicit VR Little Endian CR image of rows x columns 16-bit zeros (72 MB inflated
    by default, over the 64 MiB default limit) in ~70 KB, assembled without allocating the pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    without_pixels = dicom_bytes(ds)
    meta_end = 132 + 12 + struct.unpack("<I", without_pixels[140:144])[0]  # (0002,0000) group length
    body = zlib.decompress(without_pixels[meta_end:], -zlib.MAX_WBITS)
    n_pixel_bytes = rows * columns * 2
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n_pixel_bytes)
    chunk = next(c for c in (1_000_000, 2 * columns) if n_pixel_bytes % c == 0)
    return without_pixels[:meta_end] + _deflate_then_zeros(body + pixel_header, n_pixel_bytes, chunk)


def codestream_larger_than_header(name: str) -> tuple[bytes, str]:
    """A compressed pydicom test file whose Rows/Columns were changed to 40x40 around the original
    codestream; returns the bytes and the codestream's true size as "COLUMNSxROWS"."""
    ds = pydicom.dcmread(io.BytesIO(testdata(name)))
    true_size = f"{ds.Columns}x{ds.Rows}"
    ds.Rows = ds.Columns = 40
    return dicom_bytes(ds), true_size


# -- the table -------------------------------------------------------------------------------------------


def _bad_inputs() -> dict[str, BadInput]:
    pic = picture()
    u8, u16 = to_u8(pic), to_u16(pic)
    good_png_bytes = png(u8)
    good_jpeg_90 = jpeg(u8, quality=90)
    good_jpeg_80 = jpeg(u8, quality=80)
    good_dicom = dicom_bytes(dicom_dataset(u16))
    rg3_j2k = real_radiograph("RG3_J2KR")
    cases: dict[str, BadInput] = {}

    # -- nothing, or not an image at all
    cases["empty"] = (b"", None, ("empty",))
    cases["text"] = (b"hello, this is not an X-ray", None, ("unsupported",))
    random_bytes = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    for hint in (None, "png", "jpeg"):
        cases["random_bytes" + (f"_hinted_{hint}" if hint else "")] = (random_bytes, hint, ("unsupported",))
    random_bytes = np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    cases["random_bytes_hinted_dicom"] = (random_bytes, "dicom", ("not a dicom image",))
    for fmt, name in (("GIF", "GIF"), ("TIFF", "TIFF"), ("BMP", "BMP"), ("WEBP", "WebP")):
        buf = io.BytesIO()
        try:
            Image.fromarray(u8).save(buf, fmt)
        except (KeyError, OSError):  # this Pillow cannot write it (WebP is optional)
            continue
        cases[f"{fmt.lower()}_unsupported_format"] = (buf.getvalue(), None, ("unsupported", name.lower()))

    # -- PNG
    cases["png_truncated_half"] = (good_png_bytes[: len(good_png_bytes) // 2], None, ("png", "truncated"))
    cases["png_truncated_iend_missing"] = (good_png_bytes[:-12], None, ("png", "truncated"))
    flipped = bytearray(good_png_bytes)
    flipped[flipped.find(b"IDAT") + 40] ^= 0xFF
    cases["png_corrupt_byte_in_idat"] = (bytes(flipped), None, ("png", "corrupt"))
    noise = png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    start = noise.find(b"IDAT") - 4
    length = struct.unpack(">I", noise[start : start + 4])[0]
    payload = bytearray(noise[start + 8 : start + 8 + length])
    payload[len(payload) // 2 : len(payload) // 2 + 8] = b"\xff" * 8
    fixed = noise[:start] + png_chunk(b"IDAT", bytes(payload)) + noise[start + 12 + length :]
    cases["png_corrupt_with_valid_checksums"] = (fixed, None, ("png", "corrupt"))
    cases["png_bomb_8000x8000"] = (png_bomb(8000, 8000), None, ("too large", "8000x8000"))
    cases["png_header_claims_30000x30000"] = (png_header_liar(30000, 30000), None, ("too large", "30000x30000"))
    cases["png_tiny_400x20"] = (png(np.zeros((20, 400), np.uint8)), None, ("too small", "400x20"))
    frames = [Image.fromarray(u8), Image.fromarray(to_u8(1 - pic))]
    cases["png_animated_2_frames"] = (png(frames[0], save_all=True, append_images=frames[1:]), None,
                                      ("multi-frame", "2 frames"))
    cases["png_constant"] = (png(np.full((100, 100), 77, np.uint8)), None, ("no contrast",))

    # -- JPEG
    cases["jpeg_truncated_half"] = (good_jpeg_90[: len(good_jpeg_90) // 2], None, ("jpeg", "truncated"))
    cases["jpeg_truncated_200_bytes"] = (good_jpeg_90[:200], None, ("jpeg", "truncated"))
    cases["jpeg_header_claims_60000x60000"] = (jpeg_with_frame_size(60000, 60000), None, ("too large", "60000x60000"))
    sof = good_jpeg_80.find(b"\xff\xc0")
    length = struct.unpack(">H", good_jpeg_80[sof + 2 : sof + 4])[0]
    second_sof = bytearray(good_jpeg_80[sof : sof + 2 + length])
    second_sof[5:9] = struct.pack(">HH", 9000, 9000)  # a second SOF claiming 81 Mpx
    cases["jpeg_two_frame_headers"] = (
        good_jpeg_80[: sof + 2 + length] + bytes(second_sof) + good_jpeg_80[sof + 2 + length :], None, ("jpeg", "corrupt"))
    for marker, precision, name, words in ((0xC1, 12, "12_bit", "12-bit"), (0xC3, 8, "lossless", "lossless jpeg")):
        patched = bytearray(good_jpeg_80)
        patched[sof + 1], patched[sof + 4] = marker, precision
        cases[f"jpeg_{name}_process"] = (bytes(patched), None, (words, "not supported"))

    # -- DICOM
    cases["dicom_truncated_half"] = (good_dicom[: len(good_dicom) // 2], None, ("dicom", "truncated"))
    cases["dicom_jpeg2000_truncated_half"] = (rg3_j2k[: len(rg3_j2k) // 2], None, ("dicom", "truncated"))
    ds = pydicom.dcmread(io.BytesIO(rg3_j2k))
    codestream = b"".join(pydicom.encaps.generate_fragments(ds.PixelData))
    ds.PixelData = pydicom.encaps.encapsulate([codestream[: len(codestream) // 2]])
    cases["dicom_jpeg2000_codestream_truncated"] = (dicom_bytes(ds), None, ("could not decode", "jpeg 2000"))
    ds = dicom_dataset(u16)
    cases["dicom_no_preamble_unhinted"] = (good_dicom[132:], None, ("unsupported",))
    ds.file_meta = FileMetaDataset()  # dataset only, implicit VR little endian, no meta at all
    cases["dicom_bare_dataset_unhinted"] = (
        dicom_bytes(ds, enforce_file_format=False, implicit_vr=True, little_endian=True), None, ("unsupported",))
    ds = dicom_dataset(u16)
    del ds.PixelData
    cases["dicom_no_pixel_data"] = (dicom_bytes(ds), None, ("no pixel data",))
    cases["dicom_multiframe_3_frames"] = (dicom_bytes(dicom_dataset(np.stack([u16] * 3))), None, ("multi-frame", "3 frames"))
    cases["dicom_palette_color"] = (testdata("OBXXXX1A_rle.dcm"), None, ("palette color",))  # real ultrasound, RLE
    for photometric in ("HSV", "ARGB", "CMYK", "YBR_PARTIAL_420"):
        ds = dicom_dataset(u16)
        ds.PhotometricInterpretation = photometric
        cases[f"dicom_photometric_{photometric.lower()}"] = (dicom_bytes(ds), None, (photometric.lower(), "not supported"))
    ds = dicom_dataset(u16)
    ds.Rows = ds.Columns = 60000  # the 96 KB of pixel data would need 7.2 GB
    cases["dicom_header_claims_60000x60000"] = (dicom_bytes(ds), None, ("too large", "60000x60000"))
    for name in ("RG3_J2KR.dcm", "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        data, true_size = codestream_larger_than_header(name)
        cases[f"dicom_codestream_larger_than_header_{name[:-4].lower()}"] = (
            data, None, (f"codestream is {true_size}".lower(), "header says 40x40"))
    cases["dicom_deflated_bomb_6000x6000"] = (deflated_dicom_bomb(6000, 6000), None, ("deflated", "too large once inflated"))
    ds = dicom_dataset(u16)
    ds.Rows = 400
    cases["dicom_pixel_data_shorter_than_header"] = (dicom_bytes(ds), None, ("could not decode",))
    ds = pydicom.dcmread(io.BytesIO(rg3_j2k))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    cases["dicom_transfer_syntax_mpeg2"] = (dicom_bytes(ds), None, ("mpeg2", "not supported"))
    ds = pydicom.dcmread(io.BytesIO(rg3_j2k))
    del ds.file_meta.TransferSyntaxUID
    cases["dicom_compressed_without_transfer_syntax"] = (
        dicom_bytes(ds, enforce_file_format=False, implicit_vr=False, little_endian=True), None, ("no transfer syntax",))
    cases["dicom_constant"] = (dicom_bytes(dicom_dataset(np.full((64, 64), 1234, np.uint16))), None, ("no contrast",))

    # -- a format hint the content contradicts
    for data, hint, detected in ((good_png_bytes, "dicom", "png"), (good_png_bytes, "jpeg", "png"),
                                 (jpeg(u8), "png", "jpeg"), (rg3_j2k, "jpeg", "dicom")):
        cases[f"hint_{hint}_content_{detected}"] = (data, hint, (f"hint says {hint}", f"content is {detected}"))

    return cases


BAD_INPUTS: dict[str, BadInput] = _bad_inputs()

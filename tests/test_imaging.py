"""bytes -> decoded image -> model input: real radiographs, format parity, and every bad input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    MPEG2MPML,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from osteoscreen import dicom as dicom_mod
from osteoscreen import imaging
from osteoscreen.errors import ImageDecodeError
from osteoscreen.imaging import decode_image, load_image, to_model_input

# -- helpers ------------------------------------------------------------------------------------------


def _testdata(name: str) -> bytes:
    path = get_testdata_file(name)  # pydicom's own files plus the pydicom-data package
    assert path is not None, f"{name} not found: is pydicom-data installed?"
    with open(path, "rb") as fh:
        return fh.read()


def _picture(height: int = 240, width: int = 200) -> np.ndarray:
    """A deterministic radiograph-like picture in [0.05, 0.95]: soft background, a bright
    'vertebral column' of blocks, smooth gradients and fine texture."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    img = 0.25 + 0.15 * np.sin(xx / width * np.pi) + 0.05 * (yy / height)
    for k in range(5):
        cy = (k + 0.75) * height / 5.5
        block = (np.abs(yy - cy) < height / 14) & (np.abs(xx - width / 2) < width / 6)
        img[block] += 0.35 + 0.04 * k
    img += 0.03 * np.sin(xx / 3.0) * np.cos(yy / 4.0)
    return np.clip(img, 0.05, 0.95)


def _png(pixels: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", **save)
    return buf.getvalue()


def _jpeg(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **save)
    return buf.getvalue()


def _to_u8(unit: np.ndarray) -> np.ndarray:
    return np.round(unit * 255).astype(np.uint8)


def _to_u16(unit: np.ndarray) -> np.ndarray:
    return np.round(unit * 65535).astype(np.uint16)


def _dicom_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None) -> Dataset:
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


def _dicom_bytes(ds: Dataset, **write) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, **({"enforce_file_format": True} | write))
    return buf.getvalue()


def _png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", zlib.crc32(chunk_type + payload))


def _expect_error(data: bytes, *words: str, hint: str | None = None) -> str:
    """decode_image must fail with a short, readable message containing `words`."""
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, hint)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), message
    assert "Traceback" not in message and "File \"" not in message and len(message) < 250, message
    return message


# -- real radiographs (pydicom-data: David Clunie's CR test images) -------------------------------------


@pytest.fixture(scope="module")
def cr_images() -> dict[str, np.ndarray]:
    names = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm")
    return {name: decode_image(_testdata(name)) for name in names}


@pytest.mark.parametrize("stem, shape", [("RG1", (1955, 1841)), ("RG3", (1760, 1760))])
def test_lossless_jpeg2000_decodes_identically_to_uncompressed(cr_images, stem, shape):
    # *_J2KR is "JPEG 2000 Image Compression (Lossless Only)": reversible, so bit-identical.
    ds = pydicom.dcmread(get_testdata_file(f"{stem}_J2KR.dcm"), stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    raw, j2k = cr_images[f"{stem}_UNCR.dcm"], cr_images[f"{stem}_J2KR.dcm"]
    assert raw.shape == j2k.shape == shape
    assert raw.dtype == np.float32 and 0.0 <= raw.min() and raw.max() <= 1.0
    np.testing.assert_array_equal(raw, j2k)


def test_lossy_jpeg2000_stays_close_to_original(cr_images):
    # RG1_J2KI is irreversible JPEG 2000 (~10:1) of the same chest: close, not identical.
    original, lossy = cr_images["RG1_UNCR.dcm"], cr_images["RG1_J2KI.dcm"]
    assert np.abs(original - lossy).mean() < 0.01
    assert np.corrcoef(original.ravel(), lossy.ravel())[0, 1] > 0.99
    model_diff = np.abs(to_model_input(original) - to_model_input(lossy))
    assert model_diff.mean() < 2.0  # of 255


def test_monochrome1_is_inverted_so_bone_is_bright(cr_images):
    """RG1 is a MONOCHROME1 chest PA: in stored values the aerated lungs are *high*; displayed, they
    must be dark and the spine/mediastinum bright."""
    stored = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm")).pixel_array.astype(np.float32)
    shown = cr_images["RG1_UNCR.dcm"]
    assert np.corrcoef(stored[::4, ::4].ravel(), shown[::4, ::4].ravel())[0, 1] < -0.99

    def regions(img: np.ndarray) -> tuple[float, float]:
        small = to_model_input(img)[..., 0]
        lungs = np.concatenate([small[64:128, 48:80].ravel(), small[64:128, 144:176].ravel()])
        spine = small[64:128, 104:120]
        return float(lungs.mean()), float(spine.mean())

    lungs, spine = regions(shown)
    assert lungs + 50 < spine
    raw_lungs, raw_spine = regions(stored)
    assert raw_lungs > raw_spine + 50  # the stored orientation is the opposite


def test_window_from_header_is_applied():
    # RG3: 10-bit, window centre 550 / width 1024 (LINEAR): stored v -> (v - 38.5) / 1023, then inverted.
    ds = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
    stored = ds.pixel_array.astype(np.float64)
    expected = 1.0 - np.clip((stored - (549.5 - 511.5)) / 1023.0, 0.0, 1.0)
    np.testing.assert_allclose(decode_image(_testdata("RG3_UNCR.dcm")), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG3_J2KR.dcm"])
def test_load_image_gives_model_input(name):
    x = load_image(_testdata(name))
    assert x.shape == (224, 224, 1) and x.dtype == np.float32
    assert x.min() == 0.0 and 254.9 <= x.max() <= 255.0
    assert x.flags.writeable


def test_uncompressed_2k_dicom_decodes_fast():
    import time

    data = _testdata("RG1_UNCR.dcm")  # 1955x1841, 16-bit
    decode_image(data)
    start = time.perf_counter()
    load_image(data)
    assert time.perf_counter() - start < 1.0


def test_radiograph_as_16bit_png_matches_dicom_path(cr_images):
    shown = cr_images["RG3_UNCR.dcm"]
    png = _png(_to_u16(shown))
    np.testing.assert_allclose(load_image(png), to_model_input(shown), atol=0.05)
    np.testing.assert_allclose(decode_image(png, "png"), shown, atol=1 / 65535)


def test_pydicom_sees_the_compressed_syntax_decoders():
    plugins = dicom_mod.decoder_plugins()
    for name in (
        "JPEG Baseline (Process 1)",
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
        "JPEG-LS Lossless Image Compression",
        "JPEG 2000 Image Compression (Lossless Only)",
        "JPEG 2000 Image Compression",
        "RLE Lossless",
    ):
        assert plugins[name], f"no decoder for {name}: install the pylibjpeg plugins"


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_lossless_syntaxes_match_uncompressed(name):
    np.testing.assert_array_equal(decode_image(_testdata(name)), decode_image(_testdata("MR_small.dcm")))


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPGExtended.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_jpeg_syntaxes_decode(name):
    gray = decode_image(_testdata(name))
    assert gray.ndim == 2 and gray.dtype == np.float32 and 0.0 <= gray.min() < gray.max() <= 1.0


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm", "US1_J2KR.dcm"])
def test_colour_dicom_becomes_luminance(name):
    gray = decode_image(_testdata(name))
    assert gray.ndim == 2 and 0.0 <= gray.min() < gray.max() <= 1.0


# -- one picture, every format ----------------------------------------------------------------------------


def test_formats_and_bit_depths_of_one_picture_agree():
    picture = _picture()
    u8, u16 = _to_u8(picture), _to_u16(picture)
    reference = to_model_input(picture)
    inputs = {
        "png8": load_image(_png(u8)),
        "png16": load_image(_png(u16), "png"),
        "jpeg_rgb": load_image(_jpeg(Image.fromarray(np.stack([u8] * 3, axis=-1)), quality=95), "jpeg"),
        "jpeg_gray": load_image(_jpeg(Image.fromarray(u8), quality=95)),
        "jpeg_progressive": load_image(_jpeg(Image.fromarray(u8), quality=95, progressive=True)),
        "jpeg_cmyk": load_image(_jpeg(Image.fromarray(u8).convert("CMYK"), quality=95)),
        "dicom_mono2": load_image(_dicom_bytes(_dicom_dataset(u16)), "dicom"),
        "dicom_mono1_12bit": load_image(
            _dicom_bytes(_dicom_dataset((4095 - np.round(picture * 4095)).astype(np.uint16), "MONOCHROME1", 12))
        ),
    }
    for name, x in inputs.items():
        assert x.shape == (224, 224, 1) and x.dtype == np.float32, name
        diff = np.abs(x - reference)
        assert diff.mean() < (2.0 if name.startswith("jpeg") else 0.5), (name, diff.mean())
        assert np.percentile(diff, 99) < (8.0 if name.startswith("jpeg") else 2.0), name


def test_exposure_and_bit_depth_are_standardised_away():
    picture = _picture()
    dark_16bit = (1000 + np.round(picture * 300)).astype(np.uint16)  # uses 300 of 65535 levels
    np.testing.assert_allclose(load_image(_png(dark_16bit)), load_image(_png(_to_u8(picture))), atol=3.0)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1"])
def test_pillow_modes_decode_to_unit_gray(mode):
    img = Image.fromarray(_to_u8(_picture())).convert(mode)
    gray = decode_image(_png_image(img))
    assert gray.shape == (240, 200) and gray.dtype == np.float32
    assert 0.0 <= gray.min() < gray.max() <= 1.0


def _png_image(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_16bit_png_keeps_16bit_precision():
    ramp = np.tile(np.arange(0, 65536, 64, dtype=np.uint16), (40, 1))
    gray = decode_image(_png(ramp))
    np.testing.assert_allclose(gray, ramp / 65535.0, atol=1e-7)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(orientation):
    img = Image.fromarray(_to_u8(_picture(64, 48)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _png_image_with_exif(img, exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), dtype=np.float32) / 255
    np.testing.assert_allclose(decode_image(data), expected, atol=1e-6)


def _png_image_with_exif(img: Image.Image, exif: Image.Exif) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif)
    return buf.getvalue()


# -- DICOM pipeline details -------------------------------------------------------------------------------


def test_dicom_rescale_and_window_order():
    # Stored 0..1000, rescale *2 - 500 -> -500..1500; window 500 +- 500 (LINEAR_EXACT) -> 0..1000 black..white.
    stored = np.tile(np.linspace(0, 1000, 100).round().astype(np.uint16), (40, 1))
    ds = _dicom_dataset(stored, bits_stored=12)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -500
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 500, 1000, "LINEAR_EXACT"
    gray = decode_image(_dicom_bytes(ds))
    expected = np.clip((stored * 2.0 - 500) / 1000.0, 0, 1)
    np.testing.assert_allclose(gray, expected, atol=1e-5)


def test_dicom_without_window_uses_modality_min_max():
    stored = np.tile(np.arange(100, 200, dtype=np.int16), (40, 1))
    ds = _dicom_dataset(stored)
    gray = decode_image(_dicom_bytes(ds))
    np.testing.assert_allclose(gray, (stored - 100) / 99.0, atol=1e-6)


def test_dicom_voi_lut_sequence_is_applied():
    stored = np.tile(np.arange(0, 256, dtype=np.uint16), (40, 1))
    ds = _dicom_dataset(stored, bits_stored=8)
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 16])  # LUT Descriptor: entries, first mapped, bits
    item.add_new(0x00283006, "US", [min(4095, 32 * v) for v in range(256)])  # LUT Data: clips above 128
    ds.VOILUTSequence = [item]
    gray = decode_image(_dicom_bytes(ds))
    np.testing.assert_allclose(gray, np.minimum(4095, 32.0 * stored) / 4095.0, atol=1e-6)


def test_dicom_without_preamble_needs_the_hint():
    ds = _dicom_dataset(_to_u16(_picture()))
    full = _dicom_bytes(ds)
    with_meta_no_preamble = full[132:]
    ds.file_meta = FileMetaDataset()  # dataset only, implicit VR little endian, no meta at all
    bare = _dicom_bytes(ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    expected = decode_image(full)
    for data in (with_meta_no_preamble, bare):
        np.testing.assert_array_equal(decode_image(data, "dicom"), expected)
        np.testing.assert_array_equal(decode_image(data, "application/dicom"), expected)
        _expect_error(data, "unsupported")  # no hint: not guessed


# -- bad input ---------------------------------------------------------------------------------------------


def test_empty():
    _expect_error(b"", "empty")


def test_over_max_bytes(monkeypatch):
    data = _png(_to_u8(_picture()))
    monkeypatch.setattr(imaging, "MAX_BYTES", len(data) - 1)
    _expect_error(data, "too large", f"{len(data)} bytes")


def test_truncated_png():
    data = _png(_to_u8(_picture()))
    _expect_error(data[: len(data) // 2], "PNG", "truncated")
    _expect_error(data[:-12], "PNG", "truncated")  # only IEND missing


def test_corrupt_bytes_inside_png():
    data = bytearray(_png(_to_u8(_picture())))
    idat = data.find(b"IDAT")
    data[idat + 40] ^= 0xFF
    _expect_error(bytes(data), "PNG", "corrupt")


def test_corrupt_png_with_valid_checksums_fails_in_pillow():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    data = _png(pixels)
    start = data.find(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    payload = bytearray(data[start + 8 : start + 8 + length])
    payload[len(payload) // 2 : len(payload) // 2 + 8] = b"\xff" * 8
    fixed = data[:start] + _png_chunk(b"IDAT", bytes(payload)) + data[start + 12 + length :]
    _expect_error(fixed, "PNG", "corrupt")


def test_truncated_jpeg():
    data = _jpeg(Image.fromarray(_to_u8(_picture())), quality=90)
    _expect_error(data[: len(data) // 2], "JPEG", "truncated")
    _expect_error(data[:200], "JPEG", "truncated")


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_dicom():
    data = _testdata("RG3_UNCR.dcm")
    _expect_error(data[: len(data) // 2], "DICOM", "truncated")
    data = _testdata("RG3_J2KR.dcm")
    _expect_error(data[: len(data) // 2], "DICOM", "truncated")


def test_truncated_jpeg2000_codestream_in_dicom():
    ds = pydicom.dcmread(get_testdata_file("RG3_J2KR.dcm"))
    codestream = b"".join(pydicom.encaps.generate_fragments(ds.PixelData))
    ds.PixelData = pydicom.encaps.encapsulate([codestream[: len(codestream) // 2]])
    _expect_error(_dicom_bytes(ds), "could not decode", "JPEG 2000")


@pytest.mark.parametrize("hint", [None, "png", "jpeg"])
def test_random_bytes(hint):
    data = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    _expect_error(data, "unsupported", hint=hint)


def test_random_bytes_hinted_as_dicom():
    data = np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    _expect_error(data, "not a DICOM image", hint="dicom")


def test_text_is_not_an_image():
    _expect_error(b"hello, this is not an X-ray", "unsupported")


def test_png_bomb_header_rejected_before_decoding(monkeypatch):
    """An 8000x8000 8-bit all-zero PNG (64 Mpx) compresses to ~64 KB; a patched IHDR claims 30000^2.
    Both must fail on the header: Pillow is never asked to open them."""
    width = height = 8000
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    bomb = imaging._PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    assert len(bomb) < 200_000
    liar = _png(np.zeros((64, 64), np.uint8))
    liar = liar[:8] + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)) + liar[33:]

    def must_not_open(*args, **kwargs):
        raise AssertionError("Pillow was asked to open a decompression bomb")

    monkeypatch.setattr(imaging.Image, "open", must_not_open)
    _expect_error(bomb, "too large", "8000x8000")
    _expect_error(liar, "too large", "30000x30000")


def test_pillow_pixel_limit_also_applies(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    _expect_error(_png(np.zeros((120, 120), np.uint8)), "too large")


def test_jpeg_bomb_header_rejected(monkeypatch):
    data = bytearray(_jpeg(Image.fromarray(_to_u8(_picture())), quality=80))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    monkeypatch.setattr(imaging, "MAX_PIXELS", 10_000_000)
    _expect_error(bytes(data), "too large", "60000x60000")


def test_jpeg_with_two_frame_headers_rejected(monkeypatch):
    data = _jpeg(Image.fromarray(_to_u8(_picture())), quality=80)
    sof = data.find(b"\xff\xc0")
    length = struct.unpack(">H", data[sof + 2 : sof + 4])[0]
    segment = bytearray(data[sof : sof + 2 + length])
    segment[5:9] = struct.pack(">HH", 9000, 9000)  # a second SOF claiming 81 Mpx
    monkeypatch.setattr(imaging.Image, "open", lambda *a, **k: pytest.fail("Pillow opened it"))
    _expect_error(data[: sof + 2 + length] + bytes(segment) + data[sof + 2 + length :], "JPEG", "corrupt")


@pytest.mark.parametrize("marker, precision, words", [(0xC1, 12, "12-bit"), (0xC3, 8, "lossless JPEG")])
def test_jpeg_processes_pillow_cannot_decode(marker, precision, words):
    data = bytearray(_jpeg(Image.fromarray(_to_u8(_picture())), quality=80))
    sof = data.find(b"\xff\xc0")
    data[sof + 1], data[sof + 4] = marker, precision
    _expect_error(bytes(data), words, "not supported")


def test_tiny_image():
    _expect_error(_png(np.zeros((20, 400), np.uint8)), "too small", "400x20")


def test_animated_png():
    frames = [Image.fromarray(_to_u8(_picture())), Image.fromarray(_to_u8(1 - _picture()))]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    _expect_error(buf.getvalue(), "multi-frame", "2 frames")


@pytest.mark.parametrize("fmt, name", [("GIF", "GIF"), ("TIFF", "TIFF"), ("BMP", "BMP"), ("WEBP", "WebP")])
def test_other_formats_unsupported(fmt, name):
    buf = io.BytesIO()
    try:
        Image.fromarray(_to_u8(_picture())).save(buf, fmt)
    except (KeyError, OSError):
        pytest.skip(f"Pillow cannot write {fmt} here")
    _expect_error(buf.getvalue(), "unsupported", name)


def test_dicom_without_pixel_data():
    ds = _dicom_dataset(_to_u16(_picture()))
    del ds.PixelData
    _expect_error(_dicom_bytes(ds), "no pixel data")


def test_multiframe_dicom():
    frames = np.stack([_to_u16(_picture())] * 3)
    ds = _dicom_dataset(frames)
    assert ds.NumberOfFrames == 3
    _expect_error(_dicom_bytes(ds), "multi-frame", "3 frames")


def test_palette_color_dicom():
    _expect_error(_testdata("OBXXXX1A_rle.dcm"), "PALETTE COLOR")  # real ultrasound, RLE


@pytest.mark.parametrize("photometric", ["HSV", "ARGB", "CMYK", "YBR_PARTIAL_420"])
def test_unsupported_photometric_interpretation(photometric):
    ds = _dicom_dataset(_to_u16(_picture()))
    ds.PhotometricInterpretation = photometric
    _expect_error(_dicom_bytes(ds), photometric, "not supported")


def test_dicom_header_over_max_pixels_rejected_before_decoding(monkeypatch):
    ds = _dicom_dataset(_to_u16(_picture()))
    ds.Rows = ds.Columns = 60000  # the 96 KB of pixel data would need 7.2 GB

    def must_not_decode(self):
        raise AssertionError("pixel data decoded despite the header check")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(must_not_decode))
    _expect_error(_dicom_bytes(ds), "too large", "60000x60000")


@pytest.mark.parametrize("name", ["RG3_J2KR.dcm", "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_dicom_codestream_larger_than_header_rejected_before_decoding(monkeypatch, name):
    """The codec allocates for the codestream's own size, so a header saying 40x40 around a big
    codestream must be caught from the codestream header, not after decoding it."""
    ds = pydicom.dcmread(get_testdata_file(name))
    true_size = f"{ds.Columns}x{ds.Rows}"
    ds.Rows = ds.Columns = 40
    data = _dicom_bytes(ds)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(lambda self: pytest.fail("decoded")))
    _expect_error(data, "codestream is " + true_size, "header says 40x40")


def test_deflated_dicom_decodes():
    gray = decode_image(_testdata("image_dfl.dcm"))  # Deflated Explicit VR Little Endian
    assert gray.shape == (512, 512) and gray.max() > gray.min()


def test_deflated_dicom_bomb_rejected_before_reading(monkeypatch):
    ds = _dicom_dataset(np.zeros((1000, 1000), np.uint16))  # 2 MB of zeros deflate to ~2 KB
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    data = _dicom_bytes(ds)
    assert len(data) < 10_000
    monkeypatch.setattr(imaging, "MAX_BYTES", 1_000_000)
    monkeypatch.setattr(dicom_mod.pydicom, "dcmread", lambda *a, **k: pytest.fail("pydicom inflated it"))
    _expect_error(data, "deflated", "too large once inflated")


def test_dicom_with_pixel_data_shorter_than_header():
    ds = _dicom_dataset(_to_u16(_picture()))
    ds.Rows = 400
    _expect_error(_dicom_bytes(ds), "could not decode")


def test_dicom_transfer_syntax_without_decoder():
    ds = pydicom.dcmread(get_testdata_file("RG3_J2KR.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    _expect_error(_dicom_bytes(ds), "MPEG2", "not supported")


def test_dicom_decoder_plugin_missing(monkeypatch):
    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg-openjpeg"]

    monkeypatch.setattr(dicom_mod, "get_decoder", lambda uid: Unavailable())
    _expect_error(_testdata("RG3_J2KR.dcm"), "JPEG 2000", "cannot be decoded by this server")


def test_compressed_dicom_without_transfer_syntax():
    ds = pydicom.dcmread(get_testdata_file("RG3_J2KR.dcm"))
    del ds.file_meta.TransferSyntaxUID
    data = _dicom_bytes(ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    _expect_error(data, "no transfer syntax")


@pytest.mark.parametrize(
    "make, hint, detected",
    [
        (lambda: _png(_to_u8(_picture())), "dicom", "PNG"),
        (lambda: _png(_to_u8(_picture())), "jpeg", "PNG"),
        (lambda: _jpeg(Image.fromarray(_to_u8(_picture()))), "png", "JPEG"),
        (lambda: _testdata("RG3_UNCR.dcm"), "jpeg", "DICOM"),
    ],
)
def test_hint_contradicting_content(make, hint, detected):
    _expect_error(make(), f"hint says {hint.upper()}", f"content is {detected}", hint=hint)


def test_unknown_hint():
    _expect_error(_png(_to_u8(_picture())), "unknown format hint", hint="tiff")


@pytest.mark.parametrize("hint", ["PNG", "image/png", "image/png; q=1", "", "application/octet-stream", None])
def test_hint_spellings(hint):
    assert decode_image(_png(_to_u8(_picture())), hint).shape == (240, 200)


def test_bytearray_and_memoryview_accepted():
    data = _png(_to_u8(_picture()))
    expected = decode_image(data)
    np.testing.assert_array_equal(decode_image(bytearray(data)), expected)
    np.testing.assert_array_equal(decode_image(memoryview(data)), expected)
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]


def test_constant_images():
    with pytest.raises(ImageDecodeError, match="no contrast"):
        load_image(_png(np.full((100, 100), 77, np.uint8)))
    with pytest.raises(ImageDecodeError, match="no contrast"):
        load_image(_dicom_bytes(_dicom_dataset(np.full((64, 64), 1234, np.uint16))))
    with pytest.raises(ImageDecodeError, match="no contrast"):
        to_model_input(np.zeros((50, 60), np.float32))


# -- to_model_input -----------------------------------------------------------------------------------------


def test_to_model_input_stretches_and_leaves_input_alone():
    picture = _picture(300, 120).astype(np.float32)
    before = picture.copy()
    x = to_model_input(picture, size=224)
    assert x.shape == (224, 224, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(picture, before)
    assert to_model_input(picture, size=64).shape == (64, 64, 1)


def test_to_model_input_ignores_outlier_pixels():
    picture = _picture()
    burned_in = picture.copy()
    burned_in[:5, :5] = 1.0  # a white label
    burned_in[-3:, -3:] = 0.0  # dead pixels
    np.testing.assert_allclose(to_model_input(burned_in)[20:-20, 20:-20], to_model_input(picture)[20:-20, 20:-20], atol=1.0)


def test_to_model_input_rejects_bad_arrays():
    with pytest.raises(ValueError, match="2-D"):
        to_model_input(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ImageDecodeError, match="non-finite"):
        to_model_input(np.full((50, 50), np.nan, np.float32))


def test_env_limits(monkeypatch):
    monkeypatch.setenv("OSTEOSCREEN_MAX_PIXELS", "1_000_000")
    assert imaging._env_limit("OSTEOSCREEN_MAX_PIXELS", 5) == 1_000_000
    monkeypatch.setenv("OSTEOSCREEN_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="OSTEOSCREEN_MAX_PIXELS"):
        imaging._env_limit("OSTEOSCREEN_MAX_PIXELS", 5)
    monkeypatch.delenv("OSTEOSCREEN_MAX_PIXELS")
    assert imaging._env_limit("OSTEOSCREEN_MAX_PIXELS", 5) == 5
    assert imaging.MAX_PIXELS > 0 and imaging.MAX_BYTES > 0


def test_implicit_vr_dicom_with_meta_decodes():
    ds = _dicom_dataset(_to_u16(_picture()))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    stored = _to_u16(_picture()).astype(np.float64)
    expected = (stored - stored.min()) / (stored.max() - stored.min())  # no window: min..max
    np.testing.assert_allclose(decode_image(_dicom_bytes(ds)), expected, atol=1e-6)

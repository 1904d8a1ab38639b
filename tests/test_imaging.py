"""bytes -> decoded image -> model input: real radiographs, format parity, and every bad input."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_windowing
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian

from osteoscreen.imaging import dicom as dicom_mod
from osteoscreen.imaging import jpeg2000
from osteoscreen.imaging import decode as imaging
from osteoscreen.errors import ImageDecodeError
from osteoscreen.imaging.decode import decode_image, load_image, to_model_input
from tests import inputs
from tests.inputs import BAD_INPUTS

# -- helpers (the builders live in tests/inputs.py, shared with the serving tests) ------------------------

_testdata = inputs.testdata
_picture = inputs.picture
_png = inputs.png
_jpeg = inputs.jpeg
_to_u8 = inputs.to_u8
_to_u16 = inputs.to_u16
_dicom_dataset = inputs.dicom_dataset
_dicom_bytes = inputs.dicom_bytes


def _expect_error(data: bytes, *words: str, hint: str | None = None, call=decode_image) -> str:
    """decode_image (or `call`) must fail with a short, readable message containing `words`."""
    with pytest.raises(ImageDecodeError) as info:
        call(data, hint)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), message
    assert "Traceback" not in message and "File \"" not in message and len(message) < 250, message
    return message


# -- real radiographs (pydicom-data: David Clunie's CR test images) -------------------------------------


@pytest.fixture(scope="module")
def cr_images() -> dict[str, np.ndarray]:
    """Decoded at full resolution: large JPEG 2000 films are served from a reduced level
    (tests/test_dicom_reduce.py), the decoders themselves are compared here."""
    names = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(jpeg2000, "ENABLED", False)
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


def test_decode_cost_is_measured_by_the_benchmark_not_asserted(tmp_path):
    """Speed is reported by `osteoscreen bench --decode` (a wall-clock assert flakes on a busy CI); here only
    that the benchmark measures the real decode of a 2k radiograph, and says what it measured."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    path = get_testdata_file("RG1_UNCR.dcm")  # 1955 rows x 1841 columns, 16-bit
    result = subprocess.run([str(Path(sys.executable).parent / "osteoscreen"), "bench", "--decode", path],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    [row] = json.loads(result.stdout)["decode"]
    assert row["pixels"] == [1955, 1841] and row["bytes"] == len(_testdata("RG1_UNCR.dcm"))
    assert row["calls"] >= 3 and row["median_ms"] > 0
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"DICM not really")
    assert subprocess.run([str(Path(sys.executable).parent / "osteoscreen"), "bench", "--decode", str(bad)],
                          capture_output=True, text=True, timeout=300).returncode == 2


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


def _pydicom_display(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """What pydicom's own modality LUT and windowing show, over their output range, inverted for MONOCHROME1:
    the reference the fast linear-window path must reproduce."""
    shown = apply_windowing(apply_modality_lut(stored, ds), ds)
    black, white = apply_windowing(np.array([-np.inf, np.inf]), ds)
    unit = np.clip((shown - black) / (white - black), 0.0, 1.0)
    return 1.0 - unit if ds.PhotometricInterpretation == "MONOCHROME1" else unit


# stored dtype, rescale (slope, intercept) or None, window centre(s), width(s), VOI LUT function, photometric
_LINEAR_WINDOWS = {
    "plain_window": (np.uint16, None, 2048, 1000, None, "MONOCHROME2"),
    "monochrome1": (np.uint16, None, 2048, 1000, "LINEAR", "MONOCHROME1"),
    "linear_exact": (np.uint16, None, 1500, 700, "LINEAR_EXACT", "MONOCHROME2"),
    "ct_rescale_signed": (np.int16, (1.0, -1024.0), 40, 400, None, "MONOCHROME2"),
    "negative_slope": (np.uint16, (-0.5, 3000.0), 1800, 900, None, "MONOCHROME1"),
    "fractional_slope": (np.uint16, (0.25, 10.0), 500, 300.5, None, "MONOCHROME2"),
    "several_windows_first_wins": (np.uint16, None, [1000, 3000], [500, 2000], None, "MONOCHROME2"),
    "window_wider_than_data": (np.uint16, None, 2048, 90000, None, "MONOCHROME2"),
}


@pytest.mark.parametrize("case", sorted(_LINEAR_WINDOWS))
def test_linear_window_fast_path_equals_pydicom(case):
    """Linear rescale + linear window are computed as one float32 multiply-add (`dicom._linear_window`): it must
    be taken for these headers and show what pydicom's float64 pipeline shows, to float32 rounding."""
    dtype, rescale, center, width, function, photometric = _LINEAR_WINDOWS[case]
    info = np.iinfo(dtype)
    low, high = (-2000, 3000) if info.min < 0 else (0, 4095)
    stored = np.random.default_rng(7).integers(low, high + 1, size=(64, 80)).astype(dtype)
    stored[0, :8] = [low, high, 0, 1, 2047, 2048, 2049, 1023]  # the window's edges and the data's ends
    ds = _dicom_dataset(stored, photometric=photometric, bits_stored=12 if info.min >= 0 else 16)
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.WindowCenter, ds.WindowWidth = center, width
    if function:
        ds.VOILUTFunction = function
    assert dicom_mod._linear_window(ds) is not None  # the fast path is what this test checks
    gray = decode_image(_dicom_bytes(ds))
    assert gray.dtype == np.float32
    np.testing.assert_allclose(gray, _pydicom_display(stored, ds), atol=2e-6, rtol=0)


@pytest.mark.parametrize("change", ["sigmoid", "step_window", "flat_rescale"])
def test_other_windows_take_pydicoms_path(change):
    """What the one multiply-add cannot express goes through pydicom and still shows what pydicom shows."""
    stored = np.tile(np.linspace(0, 4095, 120).round().astype(np.uint16), (40, 1))
    ds = _dicom_dataset(stored, bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = 2048, 1000
    if change == "sigmoid":
        ds.VOILUTFunction = "SIGMOID"
    elif change == "step_window":
        ds.WindowWidth = 1  # LINEAR with width 1: black up to the centre, white above
    else:
        ds.RescaleSlope, ds.RescaleIntercept = 0, 100
    assert dicom_mod._linear_window(ds) is None
    if change == "flat_rescale":  # every pixel the same value: refused as blank, whichever path
        _expect_error(_dicom_bytes(ds), "contrast", call=load_image)
        return
    np.testing.assert_allclose(decode_image(_dicom_bytes(ds)), _pydicom_display(stored, ds), atol=1e-6)


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


def test_bad_inputs_table_is_well_formed():
    assert len(BAD_INPUTS) >= 45
    for case, (data, hint, words) in BAD_INPUTS.items():
        assert isinstance(data, bytes) and len(data) < 1_000_000, case
        assert hint in (None, "png", "jpeg", "dicom"), case
        assert words and all(isinstance(w, str) and w and w == w.lower() for w in words), case
    assert {"gif_unsupported_format", "tiff_unsupported_format", "bmp_unsupported_format"} <= set(BAD_INPUTS)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(case):
    """Every bad input is refused by load_image (the serving path) with a short message naming the
    reason; all but the undecodable-as-model-input ones already by decode_image."""
    data, hint, words = BAD_INPUTS[case]
    message = _expect_error(data, *words, hint=hint, call=load_image)
    if "no contrast" in words:  # a valid image, refused as model input
        assert "no contrast" in message
    else:
        _expect_error(data, *words, hint=hint)


def test_over_max_bytes(monkeypatch):
    data = _png(_to_u8(_picture()))
    monkeypatch.setattr(imaging, "MAX_BYTES", len(data) - 1)
    _expect_error(data, "too large", f"{len(data)} bytes")


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_real_dicom():
    data = _testdata("RG3_UNCR.dcm")
    _expect_error(data[: len(data) // 2], "DICOM", "truncated")
    data = _testdata("RG3_J2KR.dcm")
    _expect_error(data[: len(data) // 2], "DICOM", "truncated")


def test_crafted_bombs_are_what_they_claim():
    """The bombs in BAD_INPUTS are assembled from repeated deflate blocks: check they are the valid
    files they say they are, so the refusal is for their size and not for being malformed."""
    import zlib

    bomb = BAD_INPUTS["png_bomb_8000x8000"][0]
    assert len(bomb) < 200_000 and bomb == inputs.png_bomb()
    ihdr_at = bomb.find(b"IHDR")
    assert bomb[ihdr_at + 4 : ihdr_at + 14] == bytes.fromhex("00001f40 00001f40 08 00".replace(" ", ""))
    idat_at = bomb.find(b"IDAT")
    length = int.from_bytes(bomb[idat_at - 4 : idat_at], "big")
    pixels = zlib.decompress(bomb[idat_at + 4 : idat_at + 4 + length])  # checks the adler32 too
    assert len(pixels) == 8001 * 8000 and pixels.count(0) == len(pixels)
    with Image.open(io.BytesIO(inputs.png_bomb(400, 300))) as small:  # the same recipe, small: Pillow agrees
        assert small.size == (400, 300) and small.mode == "L" and not np.asarray(small).any()

    dicom = BAD_INPUTS["dicom_deflated_bomb_6000x6000"][0]
    assert len(dicom) < 100_000
    ds = pydicom.dcmread(io.BytesIO(dicom))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (6000, 6000, 16) and len(ds.PixelData) == 72_000_000
    assert len(ds.PixelData) > imaging.MAX_BYTES
    small = pydicom.dcmread(io.BytesIO(inputs.deflated_dicom_bomb(40, 50)))  # the same recipe, small
    assert small.pixel_array.shape == (40, 50) and not small.pixel_array.any()


def test_png_bomb_header_rejected_before_decoding(monkeypatch):
    """An 8000x8000 8-bit all-zero PNG (64 Mpx) compresses to ~64 KB; a patched IHDR claims 30000^2.
    Both must fail on the header: Pillow is never asked to open them."""

    def must_not_open(*args, **kwargs):
        raise AssertionError("Pillow was asked to open a decompression bomb")

    monkeypatch.setattr(imaging.Image, "open", must_not_open)
    for case in ("png_bomb_8000x8000", "png_header_claims_30000x30000"):
        data, hint, words = BAD_INPUTS[case]
        _expect_error(data, *words, hint=hint)
    _expect_error(inputs.png_bomb(), "too large", "8000x8000")
    _expect_error(inputs.png_header_liar(), "too large", "30000x30000")


def test_pillow_pixel_limit_also_applies(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    _expect_error(_png(np.zeros((120, 120), np.uint8)), "too large")


def test_jpeg_bomb_header_rejected(monkeypatch):
    monkeypatch.setattr(imaging, "MAX_PIXELS", 10_000_000)
    _expect_error(inputs.jpeg_with_frame_size(60000, 60000), "too large", "60000x60000")


def test_jpeg_with_two_frame_headers_rejected(monkeypatch):
    data, hint, words = BAD_INPUTS["jpeg_two_frame_headers"]
    monkeypatch.setattr(imaging.Image, "open", lambda *a, **k: pytest.fail("Pillow opened it"))
    _expect_error(data, *words, hint=hint)
    assert words == ("jpeg", "corrupt")


def test_multiframe_dicom_is_multiframe():
    ds = pydicom.dcmread(io.BytesIO(BAD_INPUTS["dicom_multiframe_3_frames"][0]))
    assert ds.NumberOfFrames == 3


def test_dicom_header_over_max_pixels_rejected_before_decoding(monkeypatch):
    data, hint, words = BAD_INPUTS["dicom_header_claims_60000x60000"]

    def must_not_decode(self):
        raise AssertionError("pixel data decoded despite the header check")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(must_not_decode))
    _expect_error(data, *words, hint=hint)
    assert words == ("too large", "60000x60000")


@pytest.mark.parametrize("name", ["RG3_J2KR.dcm", "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_dicom_codestream_larger_than_header_rejected_before_decoding(monkeypatch, name):
    """The codec allocates for the codestream's own size, so a header saying 40x40 around a big
    codestream must be caught from the codestream header, not after decoding it."""
    ds = pydicom.dcmread(get_testdata_file(name))
    true_size = f"{ds.Columns}x{ds.Rows}"
    data, size = inputs.codestream_larger_than_header(name)
    assert size == true_size
    assert BAD_INPUTS[f"dicom_codestream_larger_than_header_{name[:-4].lower()}"][0] == data
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
    crafted, _, words = BAD_INPUTS["dicom_deflated_bomb_6000x6000"]
    monkeypatch.setattr(dicom_mod.pydicom, "dcmread", lambda *a, **k: pytest.fail("pydicom inflated it"))
    _expect_error(crafted, *words)  # default limit
    monkeypatch.setattr(imaging, "MAX_BYTES", 1_000_000)
    _expect_error(data, "deflated", "too large once inflated")


def test_dicom_decoder_plugin_missing(monkeypatch):
    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg-openjpeg"]

    monkeypatch.setattr(dicom_mod, "get_decoder", lambda uid: Unavailable())
    _expect_error(_testdata("RG3_J2KR.dcm"), "JPEG 2000", "cannot be decoded by this server")


def test_hint_contradicting_real_uncompressed_dicom():
    _expect_error(_testdata("RG3_UNCR.dcm"), "hint says JPEG", "content is DICOM", hint="jpeg")


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


def test_constant_array_has_no_contrast():
    with pytest.raises(ImageDecodeError, match="no contrast"):
        to_model_input(np.zeros((50, 60), np.float32))


def test_good_inputs_decode():
    for seed in (0, 1):
        for data in (inputs.good_png(seed), inputs.good_jpeg(seed)):
            x = load_image(data)
            assert x.shape == (224, 224, 1) and x.dtype == np.float32 and len(data) < 100_000
    assert inputs.good_png(0) != inputs.good_png(1) and inputs.good_jpeg(0) != inputs.good_jpeg(1)
    assert inputs.real_radiograph("RG3_J2KR") == inputs.real_radiograph("RG3_J2KR.dcm") == _testdata("RG3_J2KR.dcm")


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
    from osteoscreen import settings

    monkeypatch.setenv("OSTEOSCREEN_MAX_PIXELS", "1_000_000")
    assert settings.current().max_pixels == 1_000_000
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv("OSTEOSCREEN_MAX_PIXELS", bad)
        with pytest.raises(ValueError, match="OSTEOSCREEN_MAX_PIXELS"):
            settings.current()
    monkeypatch.delenv("OSTEOSCREEN_MAX_PIXELS")
    assert settings.current().max_pixels == 50_000_000 == imaging.MAX_PIXELS
    assert imaging.MAX_BYTES == 64 * 1024 * 1024


def test_implicit_vr_dicom_with_meta_decodes():
    ds = _dicom_dataset(_to_u16(_picture()))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    stored = _to_u16(_picture()).astype(np.float64)
    expected = (stored - stored.min()) / (stored.max() - stored.min())  # no window: min..max
    np.testing.assert_allclose(decode_image(_dicom_bytes(ds)), expected, atol=1e-6)

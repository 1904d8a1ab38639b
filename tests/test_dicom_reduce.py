"""Large JPEG 2000 DICOMs are decoded at a reduced resolution level (osteoscreen.imaging.jpeg2000): the shape
says the reduced path ran, the values mean what pydicom's full decode means, the model input stays close to the
full decode's, and everything the reduced path does not handle gets the full decode (or its clear error)."""

from __future__ import annotations

import io
import logging

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import JPEG2000, JPEG2000Lossless

from osteoscreen import settings
from osteoscreen.errors import ImageDecodeError
from osteoscreen.imaging import jpeg2000
from osteoscreen.imaging.decode import decode_image, load_image, to_model_input
from tests.inputs import BAD_INPUTS, dicom_bytes, dicom_dataset, picture, real_radiograph

# pydicom-data's CR films: (rows, cols) in full and as served (FLOOR 448: RG1 loses 2 levels, RG3 1: 440 < 448)
FILMS = {"RG1_J2KR": ((1955, 1841), (489, 461)), "RG1_J2KI": ((1955, 1841), (489, 461)),
         "RG3_J2KR": ((1760, 1760), (880, 880)), "RG3_J2KI": ((1760, 1760), (880, 880))}


@pytest.fixture
def full_decode(monkeypatch):
    """Call `fn(*args)` with the reduced path switched off (OSTEOSCREEN_J2K_REDUCE=0): the reference."""

    def run(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(jpeg2000, "ENABLED", False)
            return fn(*args)

    return run


def _full_then_reduced(name: str, full_decode) -> tuple[np.ndarray, np.ndarray]:
    data = real_radiograph(name)
    return full_decode(decode_image, data), decode_image(data)


# -- files made here -------------------------------------------------------------------------------------


def _compressed(pixels: np.ndarray, bits_stored: int, syntax=JPEG2000Lossless, photometric="MONOCHROME2",
                **encode) -> pydicom.Dataset:
    """A CR dataset around `pixels`, JPEG 2000 compressed by pydicom (pylibjpeg-openjpeg: 5 levels, 1 tile)."""
    ds = dicom_dataset(pixels, photometric=photometric, bits_stored=bits_stored)
    ds.compress(syntax, encoding_plugin="pylibjpeg", **encode)
    return ds


def _wrapped(codestream: bytes, pixels: np.ndarray, bits_stored: int) -> pydicom.Dataset:
    """A CR dataset whose pixel data is `codestream` (made by Pillow here), encapsulated as JPEG 2000 Lossless."""
    ds = dicom_dataset(pixels, bits_stored=bits_stored)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    return ds


def _pillow_j2k(pixels16: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels16).save(buf, "JPEG2000", **save)
    return buf.getvalue()


_PIC = picture(1000, 900)  # rows x cols: one level down is 500 x 450, both >= 448
_U16 = np.round(_PIC * 65535).astype(np.uint16)


def _made(kind: str) -> pydicom.Dataset:
    if kind == "unsigned_12bit":
        return _compressed(np.round(_PIC * 4095).astype(np.uint16), 12)
    if kind == "signed_12bit":
        return _compressed((np.round(_PIC * 4095) - 2048).astype(np.int16), 12)
    if kind == "signed_16bit":
        return _compressed((np.round(_PIC * 65535) - 32768).astype(np.int16), 16)
    if kind == "unsigned_8bit":
        return _compressed(np.round(_PIC * 255).astype(np.uint8), 8)
    if kind == "8bit_in_16bit_words":
        return _compressed(np.round(_PIC * 255).astype(np.uint16), 8)
    if kind == "lossy_15bit":
        return _compressed(np.round(_PIC * 32767).astype(np.uint16), 15, syntax=JPEG2000, j2k_cr=[20])
    raise KeyError(kind)


MADE = ("unsigned_12bit", "signed_12bit", "signed_16bit", "unsigned_8bit", "8bit_in_16bit_words", "lossy_15bit")


def _reread(ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(dicom_bytes(ds)))


# -- the reduced path is taken, and its size ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FILMS))
def test_large_films_are_decoded_at_a_reduced_level_with_both_sides_over_the_floor(name, full_decode):
    full_shape, served_shape = FILMS[name]
    full, reduced = _full_then_reduced(name, full_decode)
    assert full.shape == full_shape and reduced.shape == served_shape
    assert min(reduced.shape) >= jpeg2000.FLOOR
    # the coarsest such level: one more would go under the floor
    assert min(-(-side // 2) for side in served_shape) < jpeg2000.FLOOR
    assert reduced.dtype == np.float32 and 0.0 <= reduced.min() < reduced.max() <= 1.0


def test_levels_to_discard_stays_over_the_floor_and_within_the_codestream():
    assert jpeg2000.levels_to_discard(1841, 1955, 5, 448) == 2  # 461 x 489; a third level: 231 x 245
    assert jpeg2000.levels_to_discard(1760, 1760, 5, 448) == 1  # 880; a second: 440 < 448
    assert jpeg2000.levels_to_discard(1760, 1760, 5, 440) == 2
    assert jpeg2000.levels_to_discard(8000, 8000, 2, 448) == 2  # no more than the codestream has
    assert jpeg2000.levels_to_discard(894, 2000, 5, 448) == 0  # 447 after one level
    assert jpeg2000.levels_to_discard(895, 2000, 5, 448) == 1  # ceil(895 / 2) = 448, as OpenJPEG sizes it


def test_switched_off_by_the_environment(monkeypatch, full_decode):
    for value, enabled in (("", True), ("1", True), ("0", False), ("off", False), ("false", False)):
        monkeypatch.setenv(jpeg2000.ENV, value)
        assert settings.current().j2k_reduce is enabled
    monkeypatch.setenv(jpeg2000.ENV, "maybe")
    with pytest.raises(settings.SettingsError, match=jpeg2000.ENV):
        settings.current()
    assert full_decode(decode_image, real_radiograph("RG1_J2KR")).shape == (1955, 1841)


# -- what the values mean -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["RG1_J2KR", "RG3_J2KI", *MADE])
def test_pillow_at_full_size_gives_exactly_pydicoms_stored_values(name):
    """The value mapping (Pillow's scaling to its 8/16-bit container and offset of signed values, undone)
    at 0 levels discarded, against pydicom's own decode: bit depth, signedness, dtype, lossy data."""
    ds = pydicom.dcmread(io.BytesIO(real_radiograph(name))) if name in FILMS else _reread(_made(name))
    codestream = get_frame(ds.PixelData, 0, number_of_frames=1)
    header = jpeg2000.read_main_header(codestream)
    assert header.precision == int(ds.BitsStored) and header.signed == bool(ds.PixelRepresentation)
    ours = jpeg2000.decode_stored(codestream, header, 0, jpeg2000._stored_dtype(ds))
    theirs = ds.pixel_array
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", MADE)
def test_made_files_reduce_to_the_same_picture(name, full_decode):
    """One picture stored at several bit depths, signed and not: at reduced resolution they all show the same
    grey levels (up to their quantisation), and each model input stays close to its own full decode's."""
    data = dicom_bytes(_made(name))
    reduced = decode_image(data)
    assert full_decode(decode_image, data).shape == (1000, 900) and reduced.shape == (500, 450)
    reference = decode_image(dicom_bytes(_made("unsigned_12bit")))
    assert np.abs(reduced - reference).max() < (0.1 if name.startswith("lossy") else 0.01)  # measured 0.061, 0.0074
    diff = np.abs(load_image(data) - full_decode(load_image, data))
    assert diff.max() < 15.0 and diff.mean() < 1.0, (diff.max(), diff.mean())


def _resized(gray: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(gray).resize(shape[::-1], Image.Resampling.BILINEAR))


@pytest.mark.parametrize("name", sorted(FILMS))
def test_reduced_decode_shows_the_full_decodes_picture(name, full_decode):
    """Same grey levels after the modality LUT, window (RG3 has one) and MONOCHROME1 inversion (both films)."""
    full, reduced = _full_then_reduced(name, full_decode)
    assert np.abs(reduced - _resized(full, reduced.shape)).mean() < 0.01


@pytest.mark.parametrize("name", sorted(FILMS))
def test_model_input_matches_the_full_decodes(name, full_decode):
    """Measured (`osteoscreen bench --j2k-reduce`): max |difference| 1.6-6.3 grey levels of 255, mean 0.04-0.32;
    without re-aligning the reduced samples (`Reduced.align`) RG1 was 27.9 max and 1.35 mean."""
    data = real_radiograph(name)
    diff = np.abs(load_image(data) - full_decode(load_image, data))
    assert diff.max() < 10.0 and diff.mean() < 0.6, (diff.max(), diff.mean())


def test_monochrome1_film_is_still_inverted_so_bone_is_bright(full_decode):
    """RG1 is MONOCHROME1: the stored values are high in the aerated lungs; shown, the lungs are dark."""
    data = real_radiograph("RG1_J2KR")
    stored = pydicom.dcmread(io.BytesIO(data)).pixel_array.astype(np.float32)
    shown = decode_image(data)
    assert shown.shape == (489, 461)
    assert np.corrcoef(_resized(stored, shown.shape).ravel(), shown.ravel())[0, 1] < -0.99
    small = to_model_input(shown)[..., 0]
    lungs = np.concatenate([small[64:128, 48:80].ravel(), small[64:128, 144:176].ravel()])
    assert lungs.mean() + 50 < small[64:128, 104:120].mean()


# -- small images, and everything the reduced path leaves to the full decode -----------------------------


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "693_J2KR.dcm"])
def test_small_jpeg2000_is_decoded_at_full_resolution(name, full_decode):
    data = real_radiograph(name)
    shape = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    np.testing.assert_array_equal(decode_image(data), full_decode(decode_image, data))
    assert decode_image(data).shape == (shape.Rows, shape.Columns)


def _fallback_case(kind: str) -> bytes:
    if kind == "under_twice_the_floor":
        return dicom_bytes(_compressed(np.round(picture(890, 700) * 4095).astype(np.uint16), 12))
    if kind == "jp2_box_around_the_codestream":
        return dicom_bytes(_wrapped(_pillow_j2k(_U16, no_jp2=False), _U16, 16))
    if kind == "no_wavelet_levels":
        return dicom_bytes(_wrapped(_pillow_j2k(_U16, no_jp2=True, num_resolutions=1), _U16, 16))
    if kind == "precision_differs_from_bits_stored":
        ds = _made("unsigned_12bit")
        ds.BitsStored, ds.HighBit = 14, 13
        return dicom_bytes(ds)
    if kind == "signedness_differs_from_pixel_representation":
        ds = _made("unsigned_12bit")
        ds.PixelRepresentation = 1
        return dicom_bytes(ds)
    if kind == "tiled":
        return dicom_bytes(_wrapped(_pillow_j2k(_U16, no_jp2=True, tile_size=(256, 300)), _U16, 16))
    if kind == "colour":
        rgb = np.stack([np.round(_PIC * 255).astype(np.uint8)] * 3, axis=-1)
        return dicom_bytes(_compressed(rgb, 8, photometric="RGB"))
    raise KeyError(kind)


FALLBACKS = ("under_twice_the_floor", "jp2_box_around_the_codestream", "no_wavelet_levels",
             "precision_differs_from_bits_stored", "signedness_differs_from_pixel_representation", "tiled", "colour")


@pytest.mark.parametrize("kind", FALLBACKS)
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the header/codestream mismatches
def test_what_the_reduced_path_does_not_handle_gets_the_full_decode(kind, full_decode):
    data = _fallback_case(kind)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert jpeg2000.decode_reduced(ds) is None
    decoded = decode_image(data)
    assert decoded.shape == (ds.Rows, ds.Columns)
    np.testing.assert_array_equal(decoded, full_decode(decode_image, data))


def test_a_codestream_pillow_refuses_gets_the_full_decode(monkeypatch, caplog, full_decode):
    def refuse(*args, **kwargs):
        raise OSError("broken data stream when reading image file")

    data = real_radiograph("RG3_J2KR")
    monkeypatch.setattr(jpeg2000.Image, "open", refuse)
    with caplog.at_level(logging.INFO, logger=jpeg2000.__name__):
        decoded = decode_image(data)
    assert "decoding at full resolution" in caplog.text
    np.testing.assert_array_equal(decoded, full_decode(decode_image, data))


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_codestream_gives_the_same_clear_error(keep, caplog, full_decode):
    """Pillow (OpenJPEG in strict mode) refuses it too; the full decode then raises its usual error, which
    serving answers as HTTP 400 / INVALID_ARGUMENT (tests/test_service.py runs BAD_INPUTS on every protocol)."""
    ds = pydicom.dcmread(io.BytesIO(real_radiograph("RG1_J2KR")))
    codestream = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([codestream[: int(len(codestream) * keep)]])
    data = dicom_bytes(ds)
    with caplog.at_level(logging.INFO, logger=jpeg2000.__name__), pytest.raises(ImageDecodeError) as reduced:
        decode_image(data)
    assert "reduced JPEG 2000 decode failed" in caplog.text  # the reduced path was tried, and refused it
    with pytest.raises(ImageDecodeError) as full:
        full_decode(decode_image, data)
    assert str(reduced.value) == str(full.value)
    assert "could not decode" in str(reduced.value) and "JPEG 2000" in str(reduced.value)
    bad, hint, words = BAD_INPUTS["dicom_jpeg2000_codestream_truncated"]  # RG3, half: the same in the table
    with pytest.raises(ImageDecodeError, match="could not decode"):
        decode_image(bad, hint)


def test_header_bomb_is_still_refused_before_decoding():
    """The codestream's own size is checked against Rows x Columns before either decoder runs."""
    bad, _, words = BAD_INPUTS["dicom_codestream_larger_than_header_rg3_j2kr"]
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bad)
    assert all(w in str(info.value).lower() for w in words)


def test_a_component_override_of_the_levels_is_read():
    """A COC marker for component 0 overrides COD's decomposition levels (ISO/IEC 15444-1 A.6.2)."""
    ds = pydicom.dcmread(io.BytesIO(real_radiograph("RG3_J2KR")))
    codestream = get_frame(ds.PixelData, 0, number_of_frames=1)
    assert jpeg2000.read_main_header(codestream).levels == 5
    siz_end = 4 + int.from_bytes(codestream[4:6], "big")
    coc = bytes([0xFF, 0x53, 0, 9, 0, 0, 1, 4, 4, 0, 1])  # Ccoc 0, Scoc 0, 1 level, 64x64 blocks, 5/3
    assert jpeg2000.read_main_header(codestream[:siz_end] + coc + codestream[siz_end:]).levels == 1
    with pytest.raises(ValueError):
        jpeg2000.read_main_header(codestream[:siz_end] + coc[:6])  # truncated main header


def test_the_benchmark_compares_every_level_and_marks_the_served_one():
    """`osteoscreen bench --j2k-reduce` (numbers reported, never asserted): one row per level discarded, the
    served one marked, differences growing as levels go, and the module's settings left as they were."""
    from pydicom.data import get_testdata_file

    from osteoscreen.imaging.bench import compare_jpeg2000_reduce

    report = compare_jpeg2000_reduce(get_testdata_file("RG3_J2KI.dcm"), repeats=1)
    assert report["shape"] == [1760, 1760] and report["full_cpu_ms"] > 0
    rows = report["reduced"]
    assert [r["levels"] for r in rows] == [1, 2, 3, 4, 5] and [r["shape"][0] for r in rows] == [880, 440, 220, 110, 55]
    assert [r["levels"] for r in rows if r["served"]] == [1]
    assert [r["mean_abs_diff"] for r in rows] == sorted(r["mean_abs_diff"] for r in rows)
    assert jpeg2000.ENABLED and jpeg2000.FLOOR == 448

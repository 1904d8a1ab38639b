"""A small radiology archive for the screening tests (issue 24): phantom lateral lumbar films wrapped in real CR
headers (pydicom-data's RG3, with the identifiers set), several patients with several studies, next to
pydicom-data's own instances the header checks exclude (chest, MR, US) and one corrupt file."""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import generate_uid

from tests.inputs import real_radiograph, testdata  # noqa: F401 - testdata: for the tests using the archive


@dataclass(frozen=True)
class Film:
    patient_id: str
    study_uid: str
    study_date: date
    sop_uid: str


def lumbar(pixels: np.ndarray, patient_id: str, study_uid: str, study_date: date, age: str = "065Y") -> bytes:
    """A CR LSPINE LL instance of an adult around 16-bit `pixels`, in study `study_uid`."""
    ds = pydicom.dcmread(io.BytesIO(real_radiograph("RG3_J2KR")))
    ds.PatientID, ds.PatientName, ds.PatientAge = patient_id, f"Test^{patient_id}", age
    ds.BodyPartExamined, ds.ViewPosition = "LSPINE", "LL"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyDate = study_date.strftime("%Y%m%d")
    ds.PatientBirthDate = f"{study_date.year - int(age[:3]):04d}0101"  # RG3's own birth date makes them 41
    del ds.WindowCenter, ds.WindowWidth  # RG3's window is for its own 12-bit pixels
    ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=16)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def phantom_pixels(png: Path) -> np.ndarray:
    """A phantom PNG (8 or 16 bit) as uint16, the resolution halved (smaller files, same anatomy)."""
    with Image.open(png) as img:
        arr = np.asarray(img).astype(np.float64)
    arr = arr / (65535.0 if arr.max() > 255 else 255.0)
    return np.round(arr[::2, ::2] * 65535).astype(np.uint16)


def build(root: Path, phantom_pngs: list[Path], patients: int = 4, studies: int = 2,
          prefix: str = "PAT") -> list[Film]:
    """`patients` x `studies` lumbar films (one per study) from `phantom_pngs` under root/lumbar/, plus the
    excluded and corrupt instances under root/other/. Returns the lumbar films."""
    films = []
    (root / "lumbar").mkdir(parents=True)
    (root / "other").mkdir(parents=True)
    pngs = iter(phantom_pngs)
    for p in range(patients):
        for s in range(studies):
            film = Film(f"{prefix}{p:03d}", generate_uid(), date(2020, 1, 1) + timedelta(days=100 * s + p),
                        "")
            data = lumbar(phantom_pixels(next(pngs)), film.patient_id, film.study_uid, film.study_date)
            film = Film(film.patient_id, film.study_uid, film.study_date,
                        str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID))
            (root / "lumbar" / f"{film.sop_uid}.dcm").write_bytes(data)
            films.append(film)
    for name in OTHERS:
        (root / "other" / name).write_bytes(testdata(name))
    whole = lumbar(phantom_pixels(next(pngs)), f"{prefix}BAD", generate_uid(), date(2020, 6, 1))
    (root / "other" / "corrupt.dcm").write_bytes(whole[: len(whole) * 3 // 5])  # header intact, pixels cut short
    return films


# pydicom-data's and pydicom's instances outside the intended use: chest CR, MR, US
OTHERS = ("RG1_J2KR.dcm", "MR_small.dcm", "US1_J2KR.dcm")

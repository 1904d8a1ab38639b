"""Header checks for DICOM inputs: modality, body part, view and patient age against the model's intended use.

A missing or empty tag is not a refusal (many exports drop BodyPartExamined or ViewPosition; the content check
still looks at every image); a tag that contradicts the intended use is. Only the header is read here
(`stop_before_pixels`), so the check costs a few hundred microseconds next to decoding; bytes pydicom cannot
parse give no findings, and the decoder then says what is wrong with them.
"""

from __future__ import annotations

import io
import re
from datetime import date

import pydicom
from pydicom.dataset import Dataset

from osteoscreen.imaging.decode import detect_format
from osteoscreen.intended_use.rules import IntendedUse, normalise
from osteoscreen.types import Finding

_AGE = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def read_header(data: bytes, format_hint: str | None = None) -> Dataset | None:
    """The DICOM header of `data` without its pixels, or None when the bytes are not (parsable) DICOM."""
    detected = detect_format(data)
    forced = detected is None and (format_hint or "").split(";")[0].strip().lower() in ("dicom", "dcm",
                                                                                         "application/dicom")
    if detected != "dicom" and not forced:
        return None
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=forced)
    except Exception:  # noqa: BLE001 - the decoder reports unusable DICOM with its own, better message
        return None


def header_findings(data: bytes, format_hint: str | None, rules: IntendedUse) -> list[Finding]:
    """What the DICOM header of `data` says against `rules`; [] for PNG/JPEG and for headers that agree. For
    files read without decoding (training manifests, site validation); a server checks `Decoded.header`."""
    return decoded_findings(read_header(data, format_hint), rules)


def decoded_findings(header: Dataset | None, rules: IntendedUse) -> list[Finding]:
    """The header checks on an already parsed header (`imaging.decode.Decoded.header`; None: not DICOM)."""
    return [] if header is None else check_dataset(header, rules)


def check_dataset(ds: Dataset, rules: IntendedUse) -> list[Finding]:
    findings = []
    modality = _text(ds, "Modality")
    if modality and normalise(modality) not in rules.modalities:
        findings.append(Finding("modality", modality, f"modality {modality} is not a projection radiograph "
                                                      f"(the model is for {'/'.join(rules.modalities)})"))
    body_part = _text(ds, "BodyPartExamined")
    if body_part and normalise(body_part) not in rules.body_parts:
        findings.append(Finding("body_part", body_part,
                                f"body part examined {body_part} is not the lumbar spine the model was trained on"))
    view = _text(ds, "ViewPosition") or _view_code(ds)
    if view and normalise(view) not in rules.views:
        findings.append(Finding("view", view, f"view {view} is not the lateral projection the model was trained on"))
    age = patient_age_years(ds)
    lo, hi = rules.age_years
    if age is not None and not lo <= age <= hi:
        band = f"under {lo:g}" if age < lo else f"over {hi:g}"  # a band, never the age: with the date it identifies
        findings.append(Finding("patient_age", band,
                                f"patient age {band} years is outside {lo:g}-{hi:g} years ({rules.age_source})"))
    return findings


def patient_age_years(ds: Dataset) -> float | None:
    """PatientAge ("065Y", "010M"...), else PatientBirthDate against the study or acquisition date; None when
    neither is there or readable (a malformed age is not evidence of anything)."""
    match = _AGE.match(_text(ds, "PatientAge"))
    if match and int(match.group(1)) > 0:  # "000Y" is what de-identification tools write for "removed"
        return round(int(match.group(1)) * _DAYS_PER_UNIT[match.group(2)] / 365.25, 1)
    born = _date(_text(ds, "PatientBirthDate"))
    seen = next((d for d in (_date(_text(ds, k)) for k in ("StudyDate", "AcquisitionDate", "ContentDate")) if d), None)
    if born is None or seen is None or seen < born:
        return None
    return round((seen - born).days / 365.25, 1)


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element is treated as absent
        return ""
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if len(value) else ""
    return str(value).strip()


def _view_code(ds: Dataset) -> str:
    """The view from ViewCodeSequence's code meaning ("lateral", "antero-posterior"...) when ViewPosition is empty."""
    try:
        seq = ds.get("ViewCodeSequence")
        meaning = str(seq[0].get("CodeMeaning", "")).strip() if seq else ""
    except Exception:  # noqa: BLE001
        return ""
    if "lateral" in meaning.lower() and "oblique" not in meaning.lower():
        return "LATERAL"
    return meaning


def _date(text: str) -> date | None:
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None

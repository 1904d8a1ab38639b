"""The header stage: what can be known of an input before its pixels are read.

For a DICOMweb instance, the attributes its QIDO-RS search answered, completed where they lack body part or
view by its WADO-RS metadata (the header as JSON, no pixel data): nothing is retrieved. For a DICOM file,
the header alone (pydicom's `stop_before_pixels`: only the bytes before the pixel data are read),
which gives the instance's id and identifiers and feeds the intended-use header checks: an instance they
exclude is never decoded. A PNG or JPEG has no header; its id is the sha256 of its bytes, so a renamed copy
is still the same input. A file that cannot be read becomes a failed row here, with its error.
"""

from __future__ import annotations

import hashlib
from datetime import date

import pydicom

from osteoscreen.imaging.decode import detect_format
from osteoscreen.intended_use.header import check_dataset
from osteoscreen.intended_use.rules import IntendedUse
from osteoscreen.screening import dicomweb
from osteoscreen.screening.schema import EXCLUDED, FAILED, PENDING
from osteoscreen.screening.sources import open_input

_PREAMBLE = 132  # 128-byte preamble + "DICM"
METADATA_WANTED = ("BodyPartExamined", "ViewPosition")  # asked of the metadata when a QIDO answer lacks them


def inspect(row: dict, rules: IntendedUse, rate: float | None = None) -> dict:
    """One input's row with id, identifiers, study date and status (pending, excluded or failed). `rate`: this
    process's share of a DICOMweb archive's request limit."""
    source = row["source"]
    out = {"source": source, "patient_id": row.get("patient_id"), "study_instance_uid": row.get("study_instance_uid"),
           "series_instance_uid": None, "study_date": parse_date(row.get("study_date")), "status": PENDING,
           "reason": None, "findings": []}
    if row.get("qido"):  # a DICOMweb search result: the attributes the archive answered, no pixels fetched
        ds = pydicom.Dataset.from_json(row["qido"])
        if not all(k in ds for k in METADATA_WANTED):  # archives answer few attributes (Orthanc: neither)
            try:
                ds = dicomweb.metadata(source, rate)  # the header, without pixel data (WADO-RS metadata)
            except Exception as exc:  # noqa: BLE001 - this instance's failure, on its row
                return {**out, "id": _text(ds, "SOPInstanceUID"), "status": FAILED,
                        "reason": f"the archive did not give the instance's metadata ({type(exc).__name__})"}
    else:
        try:
            with open_input(source) as fh:
                head = fh.read(_PREAMBLE)
                if detect_format(head) != "dicom":
                    return {**out, "id": _sha256(head, fh)}
                fh.seek(0)
                try:
                    ds = pydicom.dcmread(fh, stop_before_pixels=True)
                except Exception:  # noqa: BLE001 - any parse failure is this input's error, never the job's
                    fh.seek(0)
                    return {**out, "id": _sha256(b"", fh), "status": FAILED,
                            "reason": "the DICOM header cannot be read"}
        except OSError as exc:
            return {**out, "id": "source-sha256:" + hashlib.sha256(source.encode()).hexdigest(), "status": FAILED,
                    "reason": f"cannot read the input: {exc.strerror or type(exc).__name__}"}
    out.update(id=_text(ds, "SOPInstanceUID") or None, patient_id=_text(ds, "PatientID") or out["patient_id"],
               study_instance_uid=_text(ds, "StudyInstanceUID") or None,
               series_instance_uid=_text(ds, "SeriesInstanceUID") or None,
               study_date=parse_date(_text(ds, "StudyDate")) or out["study_date"])
    if out["id"] is None:
        with open_input(source) as fh:
            out["id"] = _sha256(b"", fh)
    findings = check_dataset(ds, rules)
    if findings:
        checks = [f.check for f in findings]
        out.update(status=EXCLUDED, reason=",".join(checks), findings=checks)
    return out


def in_range(row: dict, since: date | None, until: date | None) -> bool:
    """Whether the row's study date is in [since, until]; without a range every row is; with one, an input
    without a study date is not (it cannot be placed in the range)."""
    if since is None and until is None:
        return True
    day = row.get("study_date")
    return day is not None and (since is None or day >= since) and (until is None or day <= until)


def parse_date(value) -> date | None:
    """A DICOM DA ("20240131") or ISO ("2024-01-31") date; None when absent or unreadable."""
    if value is None or isinstance(value, date):
        return value
    text = str(value).strip().replace("-", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _sha256(head: bytes, fh) -> str:
    digest = hashlib.sha256(head)
    while chunk := fh.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "").strip()
    except Exception:  # noqa: BLE001 - a malformed element is treated as absent
        return ""

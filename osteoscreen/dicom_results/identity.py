"""Who made a result, as every DICOM result we build says it: the SR and the overlay Secondary Capture name the
same manufacturer, model and algorithm, so this sits below both (`sr` references the overlay that `sc` builds;
neither imports the other for these)."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset

import osteoscreen
from osteoscreen.dicom_results import codes
from osteoscreen.types import ModelInfo

MANUFACTURER = "OsteoScreen"
MODEL_NAME = "OsteoScreen osteoporosis screening"
# the name space of our derived result UIDs (UUID version 5, RFC 9562): fixed, so derived UIDs never change
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://osteoscreen/dicom-results")
NOT_CLINICAL = "NOT FOR CLINICAL USE: this model was trained on synthetic (phantom) or unrecorded data."


@dataclass(frozen=True)
class Algorithm:
    """The model as the results identify it. `clinical` is True only when the model card records that real
    radiographs (not the demo phantom) trained it; unknown provenance counts as not clinical."""

    name: str
    version: str
    backbone: str
    clinical: bool = False

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    @classmethod
    def of(cls, model: ModelInfo) -> Algorithm:
        return cls(model.name, model.version, model.backbone, model.clinical)


def contributing_equipment(algorithm: Algorithm) -> hd.ContributingEquipment:
    """The algorithm as Contributing Equipment (IHE AIR). Purpose (109102, DCM, "Processing Equipment"): DICOM's
    CID 7005 has no "processing algorithm" concept, so the description says it (docs/pacs.md: Codes)."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=MODEL_NAME, software_versions=algorithm.tag[:64],
        contribution_description=f"Processing Algorithm: {MODEL_NAME}, model {algorithm.tag}")


def result_uids(source: Dataset, algorithm: Algorithm, kind: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of our `kind` of result ("sr", "sc") for `source`: derived from
    the source's SOP Instance UID and the model's name and version, as `2.25.` + the decimal of a name-based
    (SHA-1) UUID of them (PS3.5 B.2), so a re-sent image or a retried store gives the same UIDs and a
    PACS replaces the result instead of filing a second one. Another model version gives other UIDs. A
    source without a SOP Instance UID gets random ones."""
    source_uid = str(source.get("SOPInstanceUID", "") or "").strip()
    if not source_uid:
        return str(hd.UID()), str(hd.UID())
    name = "\x00".join([source_uid, algorithm.name, algorithm.version, kind])
    series, instance = (uuid.uuid5(_UID_NAMESPACE, f"{name}/{part}").int for part in ("series", "instance"))
    return f"2.25.{series}", f"2.25.{instance}"


def new_instance(source: Dataset, algorithm: Algorithm, series_number: int, kind: str) -> dict:
    """The keyword arguments every highdicom result constructor takes alike: a new series and instance of
    `kind` ("sr", "sc") for `source` (deterministic UIDs: `result_uids`), made by us (manufacturer, model,
    software version), with the algorithm as Contributing Equipment."""
    series_uid, instance_uid = result_uids(source, algorithm, kind)
    return dict(series_instance_uid=hd.UID(series_uid), series_number=series_number,
                sop_instance_uid=hd.UID(instance_uid), instance_number=1, manufacturer=MANUFACTURER,
                manufacturer_model_name=MODEL_NAME,
                software_versions=f"{osteoscreen.__version__} {algorithm.tag}"[:64],
                contributing_equipment=[contributing_equipment(algorithm)])


def encode(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()

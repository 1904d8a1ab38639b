"""Who made a result, as every DICOM result we build says it: the SR and the overlay Secondary Capture name the
same manufacturer, model and algorithm, so this sits below both (`sr` references the overlay that `sc` builds;
neither imports the other for these)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset

import osteoscreen
from osteoscreen.dicom_results import codes
from osteoscreen.types import ModelInfo

MANUFACTURER = "OsteoScreen"
MODEL_NAME = "OsteoScreen osteoporosis screening"
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


def new_instance(algorithm: Algorithm, series_number: int) -> dict:
    """The keyword arguments every highdicom result constructor takes alike: a new series and instance, made by
    us (manufacturer, model, software version), with the algorithm as Contributing Equipment."""
    return dict(series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(),
                instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=MODEL_NAME,
                software_versions=f"{osteoscreen.__version__} {algorithm.tag}"[:64],
                contributing_equipment=[contributing_equipment(algorithm)])


def encode(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()

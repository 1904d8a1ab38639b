"""The inverse of `sr.build`, through highdicom's SR reader: what a PACS consumer parses out of our SR.

Tests compare it with the prediction that produced the SR (also after a round trip through a real PACS);
clients can use it to read a result back from their archive without knowing our content tree.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import highdicom as hd
import pydicom
from highdicom.sr.utils import find_content_items

from osteoscreen.dicom_results import codes


@dataclass(frozen=True)
class ReportedResult:
    probability: float
    threshold: float
    osteoporosis_present: bool | None  # None: no finding made (the image failed an intended-use check)
    algorithm_version: str  # the model tag (TID 4019)
    tracking_uid: str
    source_sop_instance_uid: str
    result_image_uids: tuple[str, ...]
    cautions: tuple[str, ...]
    outside_intended_use: tuple[str, ...] = ()  # the failed intended-use checks, as the SR names them


def read(sr_bytes: bytes) -> ReportedResult:
    doc = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(sr_bytes)))
    (group,) = doc.content.get_image_measurement_groups()
    (probability,) = group.get_measurements(name=codes.PROBABILITY)
    (threshold,) = group.get_measurements(name=codes.THRESHOLD)
    findings = group.get_qualitative_evaluations(name=codes.OSTEOPOROSIS)
    (source,) = group.source_images
    (version,) = find_content_items(group[0], name=codes.ALGORITHM_VERSION)
    results = find_content_items(group[0], name=codes.REFERENCED_RESULT)
    outside = find_content_items(group[0], name=codes.OUTSIDE_INTENDED_USE)
    cautions = [item.TextValue for container in find_content_items(doc.content[0], name=codes.QUALITATIVE_EVALUATIONS)
                for item in container.ContentSequence]
    return ReportedResult(
        probability=float(probability.value),
        threshold=float(threshold.value),
        osteoporosis_present=findings[0].value == codes.PRESENT if findings else None,
        algorithm_version=str(version.value),
        tracking_uid=str(group.tracking_uid),
        source_sop_instance_uid=str(source.referenced_sop_instance_uid),
        result_image_uids=tuple(str(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for r in results),
        cautions=tuple(cautions),
        outside_intended_use=tuple(str(item.TextValue) for item in outside),
    )

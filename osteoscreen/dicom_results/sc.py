"""The explanation overlay as a DICOM Secondary Capture image a PACS files next to the radiograph it explains.

A Secondary Capture, not a Parametric Map: the overlay is for looking at (red pushes towards osteoporosis,
blue away, drawn over the radiograph), and every PACS viewer shows an RGB Secondary Capture, while few
render a Parametric Map; the map's numbers stay in the API (`ExplainResponse.map`). Built with highdicom
from the source's header: same patient and study, its own series (9871, next to the SR's 9870), our
manufacturer, model and version, ImageType DERIVED\\SECONDARY, and the source image in the Source Image
Sequence (purpose: source image for image processing operation). The SR references this image.

Burned In Annotation follows the source: the overlay is the source's pixels scaled down, so any text burned
into the radiograph is in the overlay too, and we add none. A source that does not say gets YES, so a
de-identification pipeline never skips scrubbing an image it cannot vouch for. Errors never quote an input
value: the source is patient data.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ExplicitVRLittleEndian

from osteoscreen.dicom_results.identity import NOT_CLINICAL, Algorithm, new_instance
from osteoscreen.errors import DicomResultsError
from osteoscreen.types import Prediction

log = logging.getLogger(__name__)

SERIES_NUMBER = 9871  # right after the SR's series (9870) in a viewer's series list
SERIES_DESCRIPTION = "OsteoScreen explanation"
SOURCE_PURPOSE = dcm_codes.DCM.SourceImageForImageProcessingOperation  # 121322, CID 7202
DERIVATION = dcm_codes.DCM.SpatialResampling  # CID 7203: the radiograph scaled to the overlay's size
_PLACEHOLDER_ORIENTATION = ("L", "F")  # highdicom insists on one; replaced by the source's own below


def build(source: Dataset, rgb: np.ndarray, prediction: Prediction, algorithm: Algorithm) -> Dataset:
    """The Secondary Capture of `rgb` (uint8, (rows, columns, 3): the overlay at the radiograph's aspect) in
    `source`'s study. `prediction` is the explained result: its intended-use findings are named in the
    derivation description, as the SR names them."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DicomResultsError(f"the overlay must be an RGB image, got an array of shape {rgb.shape}")
    try:
        return _build(source, rgb, prediction, algorithm)
    except Exception as exc:  # noqa: BLE001 - highdicom's validation messages can quote patient data
        log.warning("building the DICOM overlay image failed: %s", type(exc).__name__)
        raise DicomResultsError("the explanation could not be built as a DICOM image from this input: one of its "
                                "patient or study attributes has a value DICOM does not allow") from None


def description(rgb_shape: tuple[int, ...], prediction: Prediction, algorithm: Algorithm) -> str:
    """What the image is, for the Derivation Description (a viewer shows it with the image's details)."""
    rows, columns = rgb_shape[:2]
    text = (f"OsteoScreen explanation of the probability of osteoporosis ({prediction.probability:.3f}, "
            f"{prediction.label}, threshold {prediction.threshold:.3f}; model {algorithm.tag}): each region's "
            f"contribution drawn over the source radiograph scaled to {columns}x{rows}; red pushes towards "
            "osteoporosis, blue away from it, stronger is more opaque, scaled per image. Not a measurement.")
    if prediction.findings:
        text += (" OUTSIDE INTENDED USE, NOT A SCREENING RESULT: failed "
                 + "; ".join(f"{f.check} check ({f.reason})" for f in prediction.findings) + ".")
    if prediction.cautions:
        text += " Unusual image: check the view and the exposure."
    if not algorithm.clinical:
        text += " " + NOT_CLINICAL
    return text[:1024]  # ST


def _build(source: Dataset, rgb: np.ndarray, prediction: Prediction, algorithm: Algorithm) -> Dataset:
    laterality = str(source.get("Laterality", "") or "").strip().upper()
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=_PLACEHOLDER_ORIENTATION,
        laterality=laterality if laterality in ("R", "L") else None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **new_instance(source, algorithm, SERIES_NUMBER, "sc"),
        series_description=SERIES_DESCRIPTION + ("" if algorithm.clinical else " - NOT FOR CLINICAL USE"),
    )
    # the overlay keeps the radiograph's orientation (it is the same picture, scaled): the source's own value,
    # or empty (Type 2) when the source has none
    image.PatientOrientation = source.get("PatientOrientation") or ""
    body_part = str(source.get("BodyPartExamined", "") or "").strip()
    if body_part:
        image.BodyPartExamined = body_part  # the same picture, so the same body part
    elif laterality not in ("R", "L"):
        image.Laterality = ""  # Type 2C: empty ("unknown") when the source says neither body part nor side
    image.ConversionType = "WSD"  # made by a workstation (our algorithm) from a digital image, not digitised
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.BurnedInAnnotation = "NO" if str(source.get("BurnedInAnnotation", "")).upper() == "NO" else "YES"
    image.DerivationDescription = description(rgb.shape, prediction, algorithm)
    image.DerivationCodeSequence = [hd.sr.CodedConcept.from_code(DERIVATION)]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(SOURCE_PURPOSE)]
    reference.SpatialLocationsPreserved = "NO"  # scaled: a pixel here is not the pixel at the same place there
    image.SourceImageSequence = [reference]
    return image

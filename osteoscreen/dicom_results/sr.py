"""One prediction + its DICOM source -> an IHE AIR Comprehensive 3D SR (TID 1500 Measurement Report).

What a PACS viewer shows, top down (README "Integrating with a PACS" has the table):
  Imaging Measurement Report
    language, observer = this device (TID 1004: UID, name, manufacturer, model), procedure reported
    Imaging Measurements
      Measurement Group: tracking identifier + UID, algorithm (TID 4019: name, version = model tag),
        source image (SOP class + instance UID), Probability of osteoporosis (NUM, calibrated),
        Operating threshold (NUM), Osteoporosis = Present | Absent (CODE), result images if any (the
        explanation overlay, `osteoscreen.dicom_results.sc`)
    Qualitative Evaluations: the cautions (TEXT): screening aid, confirm with DXA; and, unless the model card
      says real radiographs trained it, "not for clinical use"
An image answered although it failed an intended-use check (OSTEOSCREEN_INTENDED_USE=flag) gets no
Present | Absent finding: its measurement group carries an "Outside intended use" TEXT item per failed check
instead, the cautions begin with "NOT A SCREENING RESULT", and the series description says so.
The document copies patient and study identification from the source, so the PACS files it in the same
study, in a new series with our manufacturer, model and version, and Contributing Equipment names the
algorithm (IHE AIR). Logs name exception types only, and errors never quote an input value: the source is
patient data.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from osteoscreen.dicom_results import codes, sc
# re-exported: the identity every result carries
from osteoscreen.dicom_results.identity import (MANUFACTURER, MODEL_NAME, NOT_CLINICAL, Algorithm,  # noqa: F401
                                               encode, new_instance)
from osteoscreen.errors import DicomResultsError
from osteoscreen.types import LABELS, DicomResults, Prediction

log = logging.getLogger(__name__)

SERIES_NUMBER = 9870  # a high number keeps our series after the acquisition's own in viewers' series lists
SERIES_DESCRIPTION = "OsteoScreen AI result"
SERIES_DESCRIPTION_OUTSIDE = "OsteoScreen AI result - OUTSIDE INTENDED USE"
SCREENING_CAUTION = ("Screening aid, not a diagnosis: a positive result needs confirmation by DXA bone densitometry; "
                     "a negative result does not exclude osteoporosis.")
NOT_SCREENING = ("NOT A SCREENING RESULT: this image failed the model's intended-use checks ({checks}); the "
                 "probability is reported for research and site validation only, and no finding is made.")
UNUSUAL_IMAGE = ("Unusual image: check the view and the exposure. The film is less like the model's training images "
                 "than typical ones ({reason}); the finding stands, but read it with the film.")
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


def require_dicom(data: bytes, format_hint: str | None = None) -> None:
    """The cheap check a server makes before queueing: DICOM results need a DICOM input (the Part 10 'DICM'
    prefix, or a client that says the bytes are DICOM)."""
    if data[128:132] != b"DICM" and format_hint != "dicom":
        raise DicomResultsError("DICOM results need a DICOM input; this image is not DICOM (send the DICOM file, "
                                "or ask for JSON)")


def read_source(data: bytes, format_hint: str | None = None) -> Dataset:
    """The source's header (pixels skipped: the SR needs identifiers, not pixels). Raises DicomResultsError
    when the input is not DICOM or lacks the UIDs a PACS files results by."""
    require_dicom(data, format_hint)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=format_hint == "dicom")
    except Exception:  # noqa: BLE001 - pydicom raises many types; the chained text may quote the input
        raise DicomResultsError("the DICOM header could not be read, so no DICOM result can be built") from None
    return check_source(ds)


def check_source(ds: Dataset | None) -> Dataset:
    """`ds` (a decoded input's header; None: the input was not DICOM) if it has the UIDs a PACS files results
    by; DicomResultsError otherwise."""
    if ds is None:
        raise DicomResultsError("DICOM results need a DICOM input; this image is not DICOM (send the DICOM file, "
                                "or ask for JSON)")
    missing = [k for k in REQUIRED if not str(ds.get(k, "") or "").strip()]
    if missing:
        raise DicomResultsError(f"the DICOM input lacks {', '.join(missing)}, needed to file a result in its study")
    return ds


def build(source: Dataset, prediction: Prediction, algorithm: Algorithm,
          result_images: Sequence[Dataset] = ()) -> Dataset:
    """The SR dataset. `result_images` are result instances already built in the source's study (e.g. the
    explanation overlay as Secondary Capture): the SR references them and lists them as evidence."""
    try:
        return _build(source, prediction, algorithm, result_images)
    except DicomResultsError:
        raise
    except Exception as exc:  # noqa: BLE001 - highdicom's validation messages can quote patient data
        log.warning("building the DICOM SR failed: %s", type(exc).__name__)
        raise DicomResultsError("a DICOM result could not be built from this input: one of its patient or study "
                                "attributes has a value DICOM does not allow") from None


def to_results(source: bytes | Dataset, prediction: Prediction, algorithm: Algorithm, format_hint: str | None = None,
               result_images: Sequence[Dataset] = (), overlay_rgb: np.ndarray | None = None) -> DicomResults:
    """The SR (and the result images) as DICOM Part 10 files, from the source's header (`Decoded.header`, or
    the source file's bytes). `overlay_rgb` (the explanation overlay, uint8 RGB) becomes a Secondary Capture
    in the source's study that the SR references."""
    source = check_source(source) if isinstance(source, Dataset) else read_source(source, format_hint)
    images = list(result_images)
    if overlay_rgb is not None:
        images.append(sc.build(source, overlay_rgb, prediction, algorithm))
    sr = build(source, prediction, algorithm, images)
    return DicomResults(sr=encode(sr), sr_sop_instance_uid=str(sr.SOPInstanceUID),
                        images=tuple(encode(image) for image in images))


def _build(source: Dataset, prediction: Prediction, algorithm: Algorithm,
           result_images: Sequence[Dataset]) -> Dataset:
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=MODEL_NAME, version=algorithm.tag, manufacturer=MANUFACTURER,
        parameters=[f"backbone={algorithm.backbone}", f"threshold={prediction.threshold:.6g}"])
    finding = codes.PRESENT if prediction.label == LABELS[1] else codes.ABSENT
    # failed intended-use checks: no finding a reader could take for a screening result (see the module doc)
    evaluations = [] if prediction.findings else [hd.sr.QualitativeEvaluation(codes.OSTEOPOROSIS, finding)]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="OsteoScreen osteoporosis screening"),
        algorithm_id=algorithm_id,
        measurements=[
            hd.sr.Measurement(name=codes.PROBABILITY, value=round(float(prediction.probability), 6),
                              unit=codes.NO_UNITS),
            hd.sr.Measurement(name=codes.THRESHOLD, value=round(float(prediction.threshold), 6),
                              unit=codes.NO_UNITS),
        ],
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    for found in prediction.findings:
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.OUTSIDE_INTENDED_USE, value=f"{found.check} check: {found.reason}"[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    for image in result_images:  # result images: the explanation overlay (sc.build)
        group[0].ContentSequence.append(hd.sr.ImageContentItem(
            name=codes.REFERENCED_RESULT, referenced_sop_class_uid=image.SOPClassUID,
            referenced_sop_instance_uid=image.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(algorithm), name=MODEL_NAME, manufacturer_name=MANUFACTURER,
            model_name=algorithm.tag))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PROCEDURE, imaging_measurements=[group], title=codes.TITLE)
    report[0].ContentSequence.append(_cautions(algorithm, prediction))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, *result_images],
        content=report[0],
        **new_instance(source, algorithm, SERIES_NUMBER, "sr"),
        series_description=SERIES_DESCRIPTION_OUTSIDE if prediction.findings else SERIES_DESCRIPTION,
        is_complete=True,
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=codes.PRIVATE_SCHEME, name=codes.PRIVATE_SCHEME_NAME, responsible_organization=MANUFACTURER)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    return sr


def _cautions(algorithm: Algorithm, prediction: Prediction) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    checks = ", ".join(dict.fromkeys(f.check for f in prediction.findings))
    texts = ([NOT_SCREENING.format(checks=checks)] if prediction.findings else []) + \
        [UNUSUAL_IMAGE.format(reason=c.reason.split("(", 1)[-1].rstrip(")")) for c in prediction.cautions] + \
        [SCREENING_CAUTION] + ([] if algorithm.clinical else [NOT_CLINICAL])
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=codes.COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for text in texts])
    return container


def _device_uid(algorithm: Algorithm) -> str:
    """One stable UID per model version, so a PACS can group every result of the same model."""
    return pydicom.uid.generate_uid(entropy_srcs=["osteoscreen", algorithm.tag])

"""The coded concepts the SR uses, in one place, so the README's table and the document cannot drift.

SNOMED CT (SCT) and DICOM (DCM) codes where a standard concept exists; where none does (the model's
probability and its operating threshold), a private coding scheme, `99OSTEO` (DICOM PS3.16 8.2: a scheme
designator starting with "99" is private), identified in the SR's Coding Scheme Identification Sequence.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99OSTEO"
PRIVATE_SCHEME_NAME = "OsteoScreen private codes"

# the finding: SNOMED CT 64859006 |Osteoporosis (disorder)|, evaluated present / absent
OSTEOPOROSIS = Code("64859006", "SCT", "Osteoporosis")
PRESENT = codes.SCT.Present  # 52101004
ABSENT = codes.SCT.Absent  # 272519000

PROBABILITY = Code("OSTEO-P", PRIVATE_SCHEME, "Probability of osteoporosis")
THRESHOLD = Code("OSTEO-T", PRIVATE_SCHEME, "Operating threshold")
NO_UNITS = codes.UCUM.NoUnits  # UCUM "1"

PROCEDURE = codes.SCT.ImagingProcedure  # 363679005
OUTSIDE_INTENDED_USE = Code("OSTEO-IU", PRIVATE_SCHEME, "Outside intended use")  # TEXT: a failed intended-use check
REFERENCED_RESULT = Code("OSTEO-IMG", PRIVATE_SCHEME, "Result image")  # a result image (e.g. an overlay) the SR points to
TITLE = codes.DCM.ImagingMeasurementReport  # 126000, the TID 1500 title
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12 container
COMMENT = codes.DCM.Comment  # 121106, the cautions
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment  # 109102, Contributing Equipment purpose
DEVICE = codes.DCM.Device  # the observer type: this algorithm, not a person
ALGORITHM_VERSION = codes.DCM.AlgorithmVersion  # TID 4019: carries the model tag

"""The results table: one row per input, with columns other tools can rely on (docs/screening.md)."""

from __future__ import annotations

import pyarrow as pa

SCREENED, EXCLUDED, FAILED = "screened", "excluded", "failed"
PENDING = "pending"  # between the stages only: header checks passed, not screened yet

SCHEMA = pa.schema([
    ("id", pa.string()),  # the SOP Instance UID; for a non-DICOM file the sha256 of its bytes
    ("source", pa.string()),  # path or URL
    ("patient_id", pa.string()),
    ("study_instance_uid", pa.string()),
    ("series_instance_uid", pa.string()),
    ("study_date", pa.date32()),
    ("status", pa.string()),  # screened | excluded | failed
    ("reason", pa.string()),  # excluded: the failed checks ("body_part", "modality,view"); failed: the error
    ("probability", pa.float64()),
    ("label", pa.string()),
    ("threshold", pa.float64()),
    ("findings", pa.list_(pa.string())),  # the intended-use checks that flagged it
    ("model", pa.string()),
    ("precision", pa.string()),
    ("time", pa.timestamp("us", tz="UTC")),
])
COLUMNS = tuple(SCHEMA.names)
PIXELS = "pixels"  # between the stages only: the model input, float32 (224, 224, 1), as bytes

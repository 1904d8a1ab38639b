"""Patient data stays out of logs: pydicom reports an attribute value it finds invalid by quoting it, both as a
log record (logger "pydicom") and as a UserWarning, which a server writes to its log. A DICOM input's values are
patient data (a malformed Patient's Name is still a name), so those reports lose the value here: the record
keeps the VR, the warning is dropped; so is highdicom's warning about a one-part person name, which quotes it.
Installed explicitly at start-up, by `service.py` in every server process and by the CLI's `main`, before any
DICOM input is read: not as a side effect of importing some module that happens to come first."""

from __future__ import annotations

import logging
import re
import warnings

# every message of pydicom.valuerep.validate_value: "Invalid value for VR PN: '...'", "The value length (70)
# exceeds the maximum length of 64 allowed for VR LO.", "Value '...' is not valid for VR ..."
_VALUE_REPORT = re.compile(r"(Invalid value for VR|The value length|Value .* (is not|exceeds))", re.DOTALL)
# highdicom's person-name check quotes the name: 'The string "..." is unlikely to represent the intended person
# name' (a single-component Patient's or Referring Physician's Name, copied from the source into our results)
_HIGHDICOM_NAME_REPORT = r"The string .* is unlikely to represent the intended person name"
_VR = re.compile(r"\bVR ([A-Z]{2})\b")


class _WithholdValues(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _VALUE_REPORT.match(message):
            vr = _VR.search(message)
            record.msg = f"invalid DICOM attribute value for VR {vr.group(1) if vr else '?'} (value withheld)"
            record.args = None
        return True


_FILTER = _WithholdValues()


def withhold_values() -> None:
    """Idempotent: filter pydicom's value reports out of logs and warnings for the whole process."""
    logger = logging.getLogger("pydicom")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=_VALUE_REPORT.pattern, category=UserWarning)
    warnings.filterwarnings("ignore", message=_HIGHDICOM_NAME_REPORT, category=UserWarning)

"""The decode stage (CPU tasks): a pending input's bytes -> the model input, through the serving path's own
decoder (`imaging.decode`), so an archive is screened exactly as an upload would be. A file that cannot be
decoded becomes a failed row with the decoder's message (which quotes no pixel or patient value)."""

from __future__ import annotations

from osteoscreen.errors import ImageDecodeError
from osteoscreen.imaging.decode import decode, to_model_input
from osteoscreen.screening import dicomweb
from osteoscreen.screening.schema import FAILED, PENDING, PIXELS
from osteoscreen.screening.sources import read_bytes


def prepare(row: dict, rate: float | None = None) -> dict:
    """`rate`: this process's share of the archive's request limit (DICOMweb sources)."""
    if row["status"] != PENDING:
        return {**row, PIXELS: b""}
    source = row["source"]
    try:
        data = dicomweb.retrieve(source, rate) if dicomweb.is_dicomweb(source) else read_bytes(source)
        pixels = to_model_input(decode(data).pixels)
    except ImageDecodeError as exc:
        return {**row, "status": FAILED, "reason": str(exc), PIXELS: b""}
    except OSError as exc:
        return {**row, "status": FAILED, "reason": f"cannot read the input: {exc.strerror or exc}",
                PIXELS: b""}
    except Exception as exc:  # noqa: BLE001 - one bad image never aborts the job; its row says what happened
        return {**row, "status": FAILED, "reason": f"cannot decode the input ({type(exc).__name__})", PIXELS: b""}
    return {**row, PIXELS: pixels.tobytes()}

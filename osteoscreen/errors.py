"""One exception family, so the CLI and the servers can tell the caller's mistakes from our bugs, and the one
table that says what each API answers for them."""

from __future__ import annotations

from dataclasses import dataclass


class OsteoScreenError(Exception):
    """Base class: an expected failure with a message meant for a person."""


class ImageDecodeError(OsteoScreenError, ValueError):
    """The bytes are not a usable radiograph. The message is safe to return to a remote client
    (HTTP 400 / gRPC INVALID_ARGUMENT)."""


class WeightsError(OsteoScreenError):
    """Pretrained weights are missing or failed verification. Never answered by using random weights."""


class DataError(OsteoScreenError):
    """A training data folder or manifest is unusable."""


class ModelNotFoundError(OsteoScreenError):
    """No registered model matches the requested tag."""


class ModelIntegrityError(OsteoScreenError):
    """A registered model's file differs from the sha256 its card recorded: never served."""


class OverloadedError(OsteoScreenError):
    """The request queue is full; the caller should retry later (gRPC RESOURCE_EXHAUSTED, HTTP 503)."""


class ModelUnavailableError(OsteoScreenError):
    """The model service is loading, restarting or unreachable; the caller should retry, here or on another
    replica (gRPC UNAVAILABLE, HTTP 503)."""


class DicomResultsError(ImageDecodeError):
    """DICOM results were asked for an input that cannot carry them (not DICOM, or lacking the study and
    instance identifiers a PACS files results by): HTTP 400 / gRPC INVALID_ARGUMENT. Its message never
    quotes a value from the input, which may be patient data."""


class OutOfIntendedUseError(OsteoScreenError):
    """The image decodes but is outside what the model was validated for (another body part, view, modality,
    age, or content unlike the training images), under the `refuse` policy (HTTP 422, gRPC FAILED_PRECONDITION).
    The message names the check and the value and is safe to return to a remote client."""

    def __init__(self, message: str, findings: tuple = ()) -> None:
        super().__init__(message)
        self.findings = findings


# -- the one error table ------------------------------------------------------------------------------------
# What every API answers for an exception, first match wins (a subclass before its base: OutOfIntendedUseError is
# no ImageDecodeError, but DicomResultsError is one). `reason` labels the rejection metrics and the explanation
# outcomes; gRPC codes are named, so this module needs no grpc import. Anything not listed is a bug: 500 /
# INTERNAL with a reference, logged as types and code locations only (`osteoscreen.security.redact`).


@dataclass(frozen=True)
class ErrorAnswer:
    http_status: int
    grpc_code: str  # a grpc.StatusCode name
    reason: str  # metric label: invalid_input | intended_use | overloaded | unavailable | deadline | internal
    message: str


TABLE: tuple[tuple[type[BaseException], int, str, str], ...] = (
    (OutOfIntendedUseError, 422, "FAILED_PRECONDITION", "intended_use"),  # valid, but not what the model is for
    (ImageDecodeError, 400, "INVALID_ARGUMENT", "invalid_input"),
    (OverloadedError, 503, "RESOURCE_EXHAUSTED", "overloaded"),
    (ModelUnavailableError, 503, "UNAVAILABLE", "unavailable"),
    (ModelNotFoundError, 503, "UNAVAILABLE", "unavailable"),  # the tag comes from the server's settings
    (TimeoutError, 504, "DEADLINE_EXCEEDED", "deadline"),
)
def answer_for(exc: BaseException, timeout: float | None = None) -> ErrorAnswer | None:
    """The table's answer for `exc`; None for an unexpected exception (the caller logs it with a reference:
    `osteoscreen.security.redact.internal_error`). Messages are the exception's own, written to be safe to
    return; a timeout's names the caller's deadline."""
    for kind, status, code, reason in TABLE:
        if isinstance(exc, kind):
            if kind is TimeoutError:
                message = f"no answer within {timeout:g}s" if timeout else "the deadline passed before the answer"
            elif kind is ModelNotFoundError:
                message = f"no model loaded on this replica: {exc}"
            else:
                message = str(exc) or reason.replace("_", " ")
            return ErrorAnswer(status, code, reason, message)
    return None

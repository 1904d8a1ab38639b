"""One exception family, so the CLI and the servers can tell the caller's mistakes from our bugs."""


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

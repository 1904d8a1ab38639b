"""Values that cross module boundaries: the model's input size and labels, the served model's identity, one
prediction, the contract every front end calls, and the shape of a (batched) model call. The lowest layer:
it imports nothing of ours, so every package can share these without a cycle."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

LABELS = ("normal", "osteoporosis")  # index 1 is the positive class
INPUT_SIZE = 224  # every backbone sees 224x224, as the seed resized its images

# A model call: a batch of N images (N, 224, 224, 1) float32 -> N rows of answers.
InferFn = Callable[[np.ndarray], Awaitable[np.ndarray]]


@dataclass(frozen=True)
class ModelInfo:
    """The served model as every answer names it: what the model service's `info` returns, and what a bundle
    says of itself (`ModelBundle.info`)."""

    name: str
    version: str
    backbone: str
    threshold: float
    intended_use: dict | None = None  # the model card's `intended_use` (rules and content cut-off)
    clinical: bool = False  # the model card records real (not phantom) training data; only then no "not for clinical use"
    precision: str = "float32"  # the extractor's compute precision, as the model service chose it
    runtime: str = "tensorflow"  # what runs the extractor (tensorflow or openvino), as the model service chose it


@dataclass(frozen=True)
class DicomResults:
    """What a PACS stores for one DICOM input: the structured report and the result images it references."""

    sr: bytes  # a DICOM Part 10 Comprehensive 3D SR (TID 1500), in the source image's study
    sr_sop_instance_uid: str
    images: tuple[bytes, ...] = ()  # result images (e.g. the explanation overlay), each DICOM Part 10


@dataclass(frozen=True)
class Finding:
    """One intended-use check an image failed: which check, the value it saw, and why that is outside."""

    check: str  # modality | body_part | view | patient_age | content
    value: str  # what the image had, e.g. "CHEST", "MR", "74.2"
    reason: str  # one sentence for a person

    def __str__(self) -> str:
        return f"{self.check} {self.value}: {self.reason}"


@dataclass(frozen=True)
class Prediction:
    probability: float  # calibrated probability of osteoporosis
    label: str  # "osteoporosis" when probability >= threshold, else "normal"
    threshold: float  # the operating threshold chosen at training time
    model: str  # model name in the BentoML store
    version: str  # model version (BentoML tag version)
    # intended-use checks this image failed; non-empty on a screening answer only under the `flag` policy (refuse
    # raises); an explanation names them under either policy (its DICOM results follow the policy)
    findings: tuple[Finding, ...] = ()
    # answered, but look again: the content check's borderline band ("unusual image: check the view and the
    # exposure"), under either policy; never a refusal and never counted as outside the intended use
    cautions: tuple[Finding, ...] = ()
    dicom: DicomResults | None = None  # only when the caller asked for DICOM results


class Predictor(Protocol):
    """The one inference path behind HTTP and both gRPC APIs.

    `predict` takes encoded image files and returns one Prediction per file, in order. It raises
    `errors.ImageDecodeError` (message names the offending index) when any input is unusable,
    `errors.OutOfIntendedUseError` when an image fails an intended-use check under the `refuse` policy,
    `errors.OverloadedError` when the queue is full or would keep the request past `timeout`,
    `errors.ModelUnavailableError` when the model cannot be reached, and `TimeoutError` when `timeout`
    seconds pass (or could not suffice even on an idle server). `dicom[i]` asks for DICOM results of image
    i (`Prediction.dicom`); an image that cannot carry them raises `errors.DicomResultsError` before any
    model work.
    """

    model_name: str
    model_version: str
    backbone: str

    def is_ready(self) -> bool: ...

    async def predict(
        self, images: Sequence[bytes], format_hints: Sequence[str | None] | None = None, timeout: float | None = None,
        dicom: Sequence[bool] | None = None,
    ) -> list[Prediction]: ...

"""The one result assembler: a model output, the intended-use findings and the served model -> `Prediction`.

Every path that answers (the served screening path, explanations, `osteoscreen predict` and `explain`, site
validation) assembles its answer here, so that the label's rule (positive at or above the threshold), the
content check's verdict and the findings' order cannot drift apart between them.
"""

from __future__ import annotations

from collections.abc import Sequence

from osteoscreen.intended_use.policy import content_caution, content_finding
from osteoscreen.intended_use.rules import IntendedUse
from osteoscreen.types import LABELS, Finding, ModelInfo, Prediction


def label_of(probability: float, threshold: float) -> str:
    return LABELS[1] if probability >= threshold else LABELS[0]


def assemble(probability: float, content_score: float, header: Sequence[Finding], model: ModelInfo,
             rules: IntendedUse) -> Prediction:
    """One image's answer. `header`: what its DICOM header said against `rules` (empty for PNG/JPEG);
    `content_score`: the content check's score from the same features as `probability` (NaN when the model has
    no content check, which then fails: `content_finding`). A score in the content check's borderline band is
    answered with a caution (`Prediction.cautions`), never a finding: it is not a refusal."""
    score = float(content_score)
    content = content_finding(score, rules.content_cutoff)
    caution = content_caution(score, rules.content_flag_cutoff, rules.content_cutoff)
    findings = (*header, *((content,) if content else ()))
    return Prediction(float(probability), label_of(probability, model.threshold), model.threshold, model.name,
                      model.version, findings=findings, cautions=(caution,) if caution else ())


def content_band_of(prediction: Prediction) -> str:
    """The content check's band an assembled answer fell in (`intended_use.policy.content_band`), for counting."""
    if any(f.check == "content" for f in prediction.findings):
        return "outside"
    return "unusual" if prediction.cautions else "typical"

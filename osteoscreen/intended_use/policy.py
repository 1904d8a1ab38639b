"""What happens to an image that fails an intended-use check: `refuse` (the default; HTTP 422, gRPC
FAILED_PRECONDITION, the CLI prints the reason and predicts nothing) or `flag` (the normal answer plus the
findings, for sites validating the model on their own films and for research). Set with
`OSTEOSCREEN_INTENDED_USE=refuse|flag`; the CLI's `--force` is `flag` for one run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

from osteoscreen import settings
from osteoscreen.errors import OutOfIntendedUseError
from osteoscreen.types import Finding

ENV = "OSTEOSCREEN_INTENDED_USE"


class Policy(str, Enum):
    REFUSE = "refuse"
    FLAG = "flag"

    @classmethod
    def from_env(cls) -> Policy:
        """The operator's policy; a misspelt value stops start-up rather than silently screening everything."""
        return cls(settings.current().intended_use)


UNUSUAL = "unusual image: check the view and the exposure"


def content_band(score: float, flag_cutoff: float | None, refuse_cutoff: float | None) -> str:
    """Which of the content check's bands a score falls in: `typical` (answered), `unusual` (answered with a
    caution: a good film now and then scores here, and so does a rotated or oddly exposed one) or `outside`
    (refused under the refuse policy). No refusal edge or no score: `outside` (a model without a content check
    cannot tell a chest film from a spine). No flag edge (a model from before the two bands): no unusual band."""
    if refuse_cutoff is None or not math.isfinite(score) or score > refuse_cutoff:
        return "outside"
    if flag_cutoff is not None and score > flag_cutoff:
        return "unusual"
    return "typical"


def content_finding(score: float, cutoff: float | None) -> Finding | None:
    """The content check's verdict on one score against the refusal edge; a model without a content check fails
    it (never silently skipped: such a model cannot tell a chest film from a spine)."""
    if cutoff is None or not math.isfinite(score):
        return Finding("content", "unavailable", "this model has no content check (trained before intended-use "
                                                 "checks existed); retrain it to screen under the refuse policy")
    if score > cutoff:
        return Finding("content", f"{score:.3g}", f"the image is unlike the model's training images "
                                                  f"(out-of-distribution score {score:.3g} > cut-off {cutoff:.3g})")
    return None


def content_caution(score: float, flag_cutoff: float | None, refuse_cutoff: float | None) -> Finding | None:
    """The borderline band's caution, for an image that is answered: None outside that band."""
    if content_band(score, flag_cutoff, refuse_cutoff) != "unusual":
        return None
    return Finding("content", f"{score:.3g}", f"{UNUSUAL} (out-of-distribution score {score:.3g}: above the "
                                              f"{flag_cutoff:.3g} typical films stay under, below the refusal "
                                              f"cut-off {refuse_cutoff:.3g})")


def enforce(findings: Sequence[Sequence[Finding]], policy: Policy) -> None:
    """Under `refuse`, raise for the first image with findings (its index when there are several images)."""
    if policy is not Policy.REFUSE:
        return
    for index, found in enumerate(findings):
        if found:
            where = f"image {index}: " if len(findings) > 1 else ""
            raise OutOfIntendedUseError(
                f"{where}outside the model's intended use (lateral lumbar spine radiographs): "
                + "; ".join(f"{f.check} check: {f.reason}" for f in found),
                tuple(found))

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


def content_finding(score: float, cutoff: float | None) -> Finding | None:
    """The content check's verdict on one score; a model without a content check fails it (never silently
    skipped: such a model cannot tell a chest film from a spine)."""
    if cutoff is None or not math.isfinite(score):
        return Finding("content", "unavailable", "this model has no content check (trained before intended-use "
                                                 "checks existed); retrain it to screen under the refuse policy")
    if score > cutoff:
        return Finding("content", f"{score:.3g}", f"the image is unlike the model's training images "
                                                  f"(out-of-distribution score {score:.3g} > cut-off {cutoff:.3g})")
    return None


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

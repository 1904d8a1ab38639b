"""The intended-use checks without a server: what `osteoscreen predict` runs, and the one call a batch
command (`osteoscreen evaluate`) makes to screen files exactly as the server would.

    predictions = screen(bundle, [file_bytes, ...])          # findings in each Prediction, never raises for them
    enforce([p.findings for p in predictions], Policy.REFUSE)  # then the operator's policy, where wanted
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from osteoscreen.imaging.decode import load_image
from osteoscreen.intended_use.header import header_findings
from osteoscreen.intended_use.policy import content_finding
from osteoscreen.types import Prediction


def screen(bundle, images: Sequence[bytes], hints: Sequence[str | None] | None = None) -> list[Prediction]:
    """Encoded files -> one Prediction per file with its intended-use findings (header checks against the
    bundle's model card, content check on the same features as the probability). `bundle` is an
    `osteoscreen.model.bundle.ModelBundle`; undecodable bytes raise ImageDecodeError as on the server."""
    hints = list(hints) if hints is not None else [None] * len(images)
    rules = bundle.intended_use
    batch = np.stack([load_image(data, hint) for data, hint in zip(images, hints, strict=True)])
    probabilities, scores = bundle.assess(batch)
    predictions = []
    for data, hint, probability, score in zip(images, hints, probabilities.tolist(), scores.tolist(), strict=True):
        found = header_findings(data, hint, rules)
        content = content_finding(score, rules.content_cutoff)
        base = bundle.prediction(probability)
        predictions.append(Prediction(base.probability, base.label, base.threshold, base.model, base.version,
                                      tuple(found + ([content] if content else []))))
    return predictions

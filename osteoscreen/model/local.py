"""The served screening path without a server: what `osteoscreen predict` runs, and the one call a batch
command (`osteoscreen evaluate`) makes to screen files exactly as the server would.

    predictions = screen(bundle, [file_bytes, ...])          # findings in each Prediction, never raises for them
    enforce([p.findings for p in predictions], Policy.REFUSE)  # then the operator's policy, where wanted
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from osteoscreen.imaging.decode import Decoded, decode, to_model_input
from osteoscreen.intended_use.header import decoded_findings
from osteoscreen.results import assemble
from osteoscreen.types import Prediction


def screen(bundle, images: Sequence[bytes], hints: Sequence[str | None] | None = None) -> list[Prediction]:
    """Encoded files -> one Prediction per file with its intended-use findings. `bundle` is an
    `osteoscreen.model.bundle.ModelBundle`; undecodable bytes raise ImageDecodeError as on the server."""
    hints = list(hints) if hints is not None else [None] * len(images)
    return screen_decoded(bundle, [decode(data, hint) for data, hint in zip(images, hints, strict=True)])


def screen_decoded(bundle, decoded: Sequence[Decoded]) -> list[Prediction]:
    """Files parsed once (`imaging.decode.decode`) -> their Predictions: header checks against the bundle's model
    card, content check on the same features as the probability, assembled as the server assembles them."""
    rules, info = bundle.intended_use, bundle.info
    probabilities, scores = bundle.assess(np.stack([to_model_input(d.pixels) for d in decoded]))
    return [assemble(p, score, decoded_findings(d.header, rules), info, rules)
            for d, p, score in zip(decoded, probabilities.tolist(), scores.tolist(), strict=True)]

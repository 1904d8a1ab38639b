"""Films that are not what the model is for but come closest: the validation films rotated a quarter turn or
cropped to their centre. Training scores them to place the content check's refusal edge
(`osteoscreen.intended_use.content.choose_refusal`), and `training.content_bands` measures what the bands do
with them. Made from a site's own films, so no foreign images need collecting. Flips are not here: an
upside-down or mirrored film is the same anatomy and is accepted on purpose (docs/intended-use.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def centre(keep: float) -> Callable[[np.ndarray], np.ndarray]:
    """The central `keep` of each side (0.5: the central quarter of the area)."""
    def crop(gray: np.ndarray) -> np.ndarray:
        h, w = gray.shape
        dh, dw = int(h * (1 - keep) / 2), int(w * (1 - keep) / 2)
        return gray[dh:h - dh, dw:w - dw]
    return crop


DOUBTFUL: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rotated 90 degrees": np.rot90,
    "cropped to its central quarter": centre(0.5),
    "cropped to its central 56%": centre(0.75),
}
FLIPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"upside down": np.flipud, "mirrored": np.fliplr}

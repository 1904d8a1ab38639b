"""Is the map faithful? Two checks where the truth is known or can be forced.

- Where: the share of the positive attribution (towards osteoporosis) that falls inside the vertebral
  bodies, against their share of the image area. A map that looked at bone puts far more than the area
  share there; one that looked at a ruler, a collimator edge or the soft tissue does not.
- What matters: the deletion test. Replace the 20% of the image the map holds most responsible for the
  result (the pixels with the most evidence in the direction of the forest's output) by the local
  background, and the probability must move more than when a random 20% (in blocks of one block4 cell,
  the map's own grain) is replaced the same way. Two fills: the local background, a wide Gaussian blur of
  the image itself, so deletion removes structure (trabeculae, shells, edges), not brightness; and, where
  the truth is known (the phantom), a neutral fill: the same film rendered with normal bone density. Blur
  alone is not neutral: blurred bone has lost its trabecular texture, and that reads as osteoporosis by
  itself, so on positive images a random 20% of blur moves p about as much as the map's top 20%.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from osteoscreen.explain.attribution import Explanation

SHARE = 0.2
BACKGROUND_SIGMA_PX = 12.0  # on the 224 input: wider than a vertebral body's trabecular texture
RANDOM_CELL_PX = 16  # a block4 cell
N_RANDOM = 4


def local_background(image: np.ndarray) -> np.ndarray:
    """The image blurred to its local mean (same shape): what a region looks like without its structure."""
    image = np.asarray(image, dtype=np.float32)
    sigma = (BACKGROUND_SIGMA_PX, BACKGROUND_SIGMA_PX) + (0.0,) * (image.ndim - 2)
    return ndimage.gaussian_filter(image, sigma, mode="nearest")


def evidence(explanation: Explanation) -> np.ndarray:
    """The map signed towards the result: positive where a pixel pushed the forest the way it went."""
    direction = 1.0 if explanation.forest_output >= explanation.expected_value else -1.0
    return direction * np.asarray(explanation.attribution, dtype=np.float64)


def top_mask(score: np.ndarray, share: float = SHARE) -> np.ndarray:
    """The `share` of pixels with the highest score (exactly that many; ties broken by position)."""
    k = int(round(share * score.size))
    order = np.argsort(-score.ravel(), kind="stable")[:k]
    mask = np.zeros(score.size, bool)
    mask[order] = True
    return mask.reshape(score.shape)


def random_cells_mask(rng: np.random.Generator, size: int, share: float = SHARE, cell: int = RANDOM_CELL_PX) -> np.ndarray:
    """A random `share` of the image, in whole cells of `cell` pixels: the grain of the map itself."""
    n = size // cell
    chosen = rng.choice(n * n, size=int(round(share * n * n)), replace=False)
    grid = np.zeros(n * n, bool)
    grid[chosen] = True
    return np.kron(grid.reshape(n, n), np.ones((cell, cell), bool)).astype(bool)


def replaced(image: np.ndarray, mask: np.ndarray, background: np.ndarray) -> np.ndarray:
    mask = mask.reshape(mask.shape + (1,) * (image.ndim - mask.ndim))
    return np.where(mask, background, image).astype(np.float32)


@dataclass(frozen=True)
class Deletion:
    probability: float  # before
    top: float  # after replacing the top share by attribution
    random: tuple[float, ...]  # after replacing a random share, one per draw

    @property
    def moved_top(self) -> float:
        return abs(self.top - self.probability)

    @property
    def moved_random(self) -> float:
        """Mean movement of the random draws (draws on either side of the probability do not cancel)."""
        return float(np.mean([abs(r - self.probability) for r in self.random]))


def deletion(image: np.ndarray, explanation: Explanation, probabilities: Callable[[np.ndarray], np.ndarray],
             rng: np.random.Generator, share: float = SHARE, n_random: int = N_RANDOM,
             fill: np.ndarray | None = None) -> Deletion:
    """One image's deletion test. `probabilities`: (N, 224, 224, 1) -> (N,), the served model's. `fill`: what
    replaces the deleted pixels (the same shape as `image`; default the local background, a blur)."""
    image = np.asarray(image, dtype=np.float32)
    background = local_background(image) if fill is None else np.asarray(fill, dtype=np.float32).reshape(image.shape)
    masks = [top_mask(evidence(explanation), share)]
    masks += [random_cells_mask(rng, image.shape[0], share) for _ in range(n_random)]
    p = np.asarray(probabilities(np.stack([replaced(image, m, background) for m in masks])), dtype=np.float64)
    return Deletion(explanation.probability, float(p[0]), tuple(float(v) for v in p[1:]))


def positive_share_inside(attribution: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(share of the positive attribution inside `mask`, `mask`'s share of the area)."""
    positive = np.clip(np.asarray(attribution, dtype=np.float64), 0.0, None)
    total = positive.sum()
    inside = float(positive[mask].sum() / total) if total > 0 else float("nan")
    return inside, float(np.mean(mask))


def mask_to_input(mask: np.ndarray, size: int) -> np.ndarray:
    """A native-resolution mask in the model-input frame (stretched to size x size, as the image is)."""
    from PIL import Image

    small = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(small) > 0.5

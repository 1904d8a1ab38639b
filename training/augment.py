"""Training-time augmentation, as the seed did: flips, small rotations, zoom, brightness/contrast, noise.

Each augmented copy is a pure function of (image, seed, round), so its features can be cached by the
image's hash like any other; a framework's stateful random layers would make that cache impossible.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MAX_ROTATION_DEG = 8.0
ZOOM_RANGE = (0.9, 1.1)
CONTRAST_RANGE = (0.85, 1.15)
BRIGHTNESS_RANGE = (-12.0, 12.0)  # on the 0..255 scale
NOISE_SD = 3.0


def augment(image: np.ndarray, seed: int, round_: int, image_hash: str) -> np.ndarray:
    """One random but reproducible variant of a (H, W, 1) 0..255 model input."""
    rng = np.random.default_rng([seed, round_, int(image_hash[:12], 16)])
    x = image[..., 0].astype(np.float32)
    if rng.random() < 0.5:
        x = x[:, ::-1]  # lateral views come facing either way
    x = ndimage.rotate(x, rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG), reshape=False, order=1, mode="reflect")
    x = _zoom_same_size(x, rng.uniform(*ZOOM_RANGE))
    mean = x.mean()
    x = (x - mean) * rng.uniform(*CONTRAST_RANGE) + mean + rng.uniform(*BRIGHTNESS_RANGE)
    x = x + rng.normal(0.0, NOISE_SD, x.shape)
    return np.clip(x, 0, 255).astype(np.float32)[..., None]


def _zoom_same_size(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom about the centre, keeping the array's shape (crop when zooming in, reflect-pad when out)."""
    h, w = x.shape
    matrix = np.diag([1 / factor, 1 / factor])
    centre = np.array([h, w]) / 2
    return ndimage.affine_transform(x, matrix, offset=centre - matrix @ centre, order=1, mode="reflect")

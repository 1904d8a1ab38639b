"""The explanation drawn over the radiograph, as a PNG a viewer or a report can show as is.

The map (in the 224x224 model-input frame, where the image was stretched) is smoothed over about one
map cell and resized back to the radiograph's own aspect, for display only, and coloured with a
diverging map centred on zero: red pushes towards osteoporosis, blue away from it; the stronger, the more
opaque. Colours are scaled per image (to the 99th percentile of |map|), so an overlay shows *where* the
evidence lies in this image, not how strong it is against other images: the probability says that.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MAX_SIDE = 512  # overlays are for looking at, not for measuring: the map itself is in the API
MAX_ALPHA = 0.75
DISPLAY_SMOOTHING_PX = 6.0  # on the 224 map: blends the 16-pixel cells for the eye (display only)
COLORMAP = "RdBu_r"  # diverging, red positive, blue negative, white at zero (colour-blind safe)


def display_gray(gray: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """The decoded radiograph (2-D, [0, 1]) scaled to at most `max_side`, with its own aspect."""
    h, w = gray.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)


def colorize(gray: np.ndarray, attribution: np.ndarray) -> np.ndarray:
    """RGB uint8 (h, w, 3): `attribution` (any size) resized onto `gray` (h, w) and blended over it."""
    from matplotlib import colormaps
    from scipy import ndimage

    h, w = gray.shape
    smooth = ndimage.gaussian_filter(np.asarray(attribution, dtype=np.float32), DISPLAY_SMOOTHING_PX, mode="nearest")
    amap = np.asarray(Image.fromarray(smooth).resize((w, h), Image.Resampling.BILINEAR))
    scale = float(np.percentile(np.abs(amap), 99)) or float(np.abs(amap).max()) or 1.0
    level = np.clip(amap / scale, -1.0, 1.0)
    colour = colormaps[COLORMAP](0.5 + 0.5 * level)[..., :3]
    alpha = (MAX_ALPHA * np.abs(level))[..., None]
    base = np.repeat(gray[..., None], 3, axis=2)
    return np.round(255.0 * ((1.0 - alpha) * base + alpha * colour)).astype(np.uint8)


def overlay_rgb(gray: np.ndarray, attribution: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """The overlay of `attribution` on the decoded radiograph `gray` (2-D, [0, 1]) as RGB uint8, at the
    radiograph's aspect: what the PNG shows and the DICOM Secondary Capture carries."""
    return colorize(display_gray(gray, max_side), attribution)


def overlay_png(gray: np.ndarray, attribution: np.ndarray, max_side: int = MAX_SIDE) -> bytes:
    """PNG bytes of the overlay of `attribution` on the decoded radiograph `gray` (2-D, [0, 1])."""
    return png_of(overlay_rgb(gray, attribution, max_side))


def png_of(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=1)  # speed over size: it is answered at once
    return buf.getvalue()

"""The size check every decoder makes from the header, before decoding pixels: decompression bombs are
refused before they allocate, and icons or thumbnails before they are mistaken for radiographs."""

from __future__ import annotations

from osteoscreen.errors import ImageDecodeError


def check_dimensions(width: int, height: int, *, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"the image is too large ({width}x{height} = {width * height} pixels; the limit is {max_pixels})"
        )
    if min(width, height) < min_side:
        raise ImageDecodeError(
            f"the image is too small ({width}x{height} pixels); need at least {min_side} pixels on each side"
        )

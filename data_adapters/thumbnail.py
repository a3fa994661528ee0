"""A 16 x 16 grayscale thumbnail of every image, taken while it is decoded once, so that near-duplicates can be
found later without decoding anything again (256 bytes an image: 100k images cost 25 MB).

16 px, not more: on 28-px images JPEG's block noise decorrelates 32-px thumbnails of one image more than two
different plain shirts differ, while at 16 px the copies stay closer than any distinct pair measured
(`bench/near_duplicates.py`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # decode imports records, which imports this module
    from .decode import Decoded

THUMB_SIDE = 16


def thumbnail(decoded: Decoded) -> np.ndarray:
    return thumbnail_of(decoded.pixels.mean(axis=0))


def thumbnail_of(gray: np.ndarray) -> np.ndarray:
    """uint8 (THUMB_SIDE, THUMB_SIDE), area-averaged, from a float (H, W) grayscale image in [0, 1]."""
    from PIL import Image

    image = Image.fromarray((np.clip(gray, 0, 1) * 255.0 + 0.5).astype(np.uint8))
    return np.asarray(image.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR), dtype=np.uint8)

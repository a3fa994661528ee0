"""Small real images shipped with the package, so `rareaug demo` runs on a fresh machine with no download.

`textures/`: 64x64 grayscale crops of three real photographs from scikit-image's data set (brick, grass,
gravel; public domain / CC0, see textures/LICENSE.txt). Gravel is the rare class. Rebuild with
`python -m rareaug.samples` (needs scikit-image, in the dev extra).
"""
from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).parent
TEXTURE_COUNTS = {"brick": 24, "grass": 24, "gravel": 12}
CROP = 64


def sample_root() -> Path:
    return SAMPLES / "textures"


def build_texture_sample(out: Path = SAMPLES / "textures") -> None:
    """Non-overlapping crops taken on a fixed grid (every other cell), so no two crops share pixels."""
    import numpy as np
    from PIL import Image
    from skimage import data

    for name, count in TEXTURE_COUNTS.items():
        image = getattr(data, name)()
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        cells = [(y, x) for y in range(0, image.shape[0] - CROP + 1, 2 * CROP)
                 for x in range(0, image.shape[1] - CROP + 1, CROP)]
        for index, (y, x) in enumerate(cells[:count]):
            crop = np.ascontiguousarray(image[y:y + CROP, x:x + CROP])
            Image.fromarray(crop).save(folder / f"{name}_{index:02d}.png", optimize=True)

"""Small real images shipped with the package, so `rareaug demo` runs on a fresh machine with no download.

`fashion/`: real Fashion-MNIST training images (MIT licence, see fashion/LICENSE.txt), 32 px: 24 pullovers
(the rare class, never seen by the mini model) and 40 of each other class. The demo's default data.
`textures/`: 64x64 grayscale crops of three real photographs from scikit-image's data set (brick, grass,
gravel; public domain / CC0, see textures/LICENSE.txt). Gravel is the rare class.
`tiles/brick/`: an MVTec AD category (train/good, test/good, test/crack, ground_truth/crack masks) of 64x64
crops of the same CC0 brick photo; the cracks are synthesized by rareaug, not real defects (tiles/LICENSE.txt).
It gives the defect generators (CutPaste, Perlin) and the mask-reading code real images to run on.
Rebuild all three with `python -m rareaug.samples` (needs scikit-image and the dataset-fashion-mnist package).
"""
from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).parent
TEXTURE_COUNTS = {"brick": 24, "grass": 24, "gravel": 12}
CROP = 64
DEFECT_CATEGORY = "brick"
DEFECT_PHOTO = "brick"  # skimage.data.brick: 512x512, one paving pattern, so its crops look alike
DEFECT_COUNTS = {"train/good": 32, "test/good": 8, "test/crack": 16}  # 56 of the photo's 64 crops
DEFECT_LICENSE = """Images: 64x64 crops of scikit-image's data image "brick" (skimage.data.brick), a real photograph.
The original comes from CC0Textures (cc0textures.com) and is licensed under Creative Commons CC0 1.0 (public
domain dedication), as scikit-image's documentation states.

The defects are NOT real. Every image under test/crack has a crack synthesized by rareaug (a seeded random walk
a few pixels wide, darkened; rareaug/samples/cracks.py), drawn on a crop that is otherwise the real photo; its
ground_truth/crack/<name>_mask.png (0/255) marks exactly the darkened pixels. train/good and test/good are
unmodified crops. The photo's 8x8 grid of non-overlapping crops is shuffled with a fixed seed and dealt out;
8 crops are unused. Made by `python -m rareaug.samples`.
"""


FASHION_RARE = "pullover"
FASHION_COUNTS = {"pullover": 24, **{name: 40 for name in ("t-shirt", "trouser", "dress", "coat", "sandal", "shirt",
                                                          "sneaker", "bag", "ankle-boot")}}
FASHION_LICENSE = """Fashion-MNIST images, copyright (c) 2017 Zalando SE, https://github.com/zalandoresearch/fashion-mnist

The MIT License (MIT). Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or
sell copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the
following conditions: The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE
SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.

Files are named fm-train-<index>.png by their index in train-images-idx3-ubyte; 28 px padded to 32 with black.
"""


def sample_root() -> Path:
    return SAMPLES / "textures"


def fashion_root() -> Path:
    return SAMPLES / "fashion"


def defect_root() -> Path:
    """The MVTec AD category folder of the defect sample (its rare class is `crack`)."""
    return SAMPLES / "tiles" / DEFECT_CATEGORY


def build_fashion_sample(out: Path = SAMPLES / "fashion", seed: int = 0) -> None:
    """A seeded draw of real training images; the mini model never saw the pullovers among them."""
    from .fashion_mnist import load_fashion_mnist, seeded_subset, write_class_folders

    images, labels = load_fashion_mnist("train")
    write_class_folders(out, "train", seeded_subset(labels, FASHION_COUNTS, seed), images, labels)
    (out / "LICENSE.txt").write_text(FASHION_LICENSE)


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


def build_defect_sample(out: Path = SAMPLES / "tiles", seed: int = 0) -> None:
    """Real crops dealt to the MVTec folders, cracks drawn on the `test/crack` ones. The folder is rebuilt from
    scratch, so a change of counts leaves no stale files behind."""
    import shutil

    import numpy as np
    from PIL import Image
    from skimage import data

    from .cracks import draw_crack

    image = getattr(data, DEFECT_PHOTO)()
    cells = [(y, x) for y in range(0, image.shape[0] - CROP + 1, CROP)
             for x in range(0, image.shape[1] - CROP + 1, CROP)]
    rng = np.random.default_rng(seed)
    order = iter(rng.permutation(len(cells)))
    category = out / DEFECT_CATEGORY
    shutil.rmtree(category, ignore_errors=True)
    for folder, count in DEFECT_COUNTS.items():
        (category / folder).mkdir(parents=True)
        for index in range(count):
            y, x = cells[next(order)]
            crop = np.ascontiguousarray(image[y:y + CROP, x:x + CROP])
            name = f"{index:03d}"
            if folder == "test/crack":
                crop, mask = draw_crack(crop, rng)
                truth = category / "ground_truth" / "crack"
                truth.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(truth / f"{name}_mask.png", optimize=True)
            Image.fromarray(crop).save(category / folder / f"{name}.png", optimize=True)
    (out / "LICENSE.txt").write_text(DEFECT_LICENSE)

"""Real Fashion-MNIST images (Zalando, MIT licence) from the Debian package `dataset-fashion-mnist`.

The mini base model is trained on six common classes and never sees the other four, which play the rare
class in the evidence benchmark. Class names are folder-safe and are exactly the `{class}` the recipes put in
prompts, so "a photo of a pullover" means the same to `fit` as to the model's own training.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from ..errors import RareaugError

# Fashion-MNIST's label order.
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
COMMON_CLASSES = ("t-shirt", "trouser", "sandal", "sneaker", "bag", "ankle-boot")
RARE_CLASSES = ("pullover", "dress", "coat", "shirt")
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fashion_mnist_folder() -> Path:
    """$FASHION_MNIST_DIR, else the Debian package's folder; one line saying how to get it when neither has it."""
    for folder in (os.environ.get("FASHION_MNIST_DIR"), DEBIAN_FOLDER):
        if folder and (Path(folder) / _FILES["train"][0]).is_file():
            return Path(folder)
    raise RareaugError(f"Fashion-MNIST not found in $FASHION_MNIST_DIR or {DEBIAN_FOLDER}; install it with "
                       f"`sudo apt-get install dataset-fashion-mnist`, or set FASHION_MNIST_DIR to a folder "
                       f"holding {_FILES['train'][0]} and the other three .gz files")


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28, labels int64 N) of the "train" (60,000) or "test" (10,000) split."""
    folder = fashion_mnist_folder()
    images_file, labels_file = (folder / name for name in _FILES[split])
    images = _read_idx(images_file)
    labels = _read_idx(labels_file).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise RareaugError(f"{images_file}: not a Fashion-MNIST image file; reinstall dataset-fashion-mnist")
    return images, labels


def class_index(name: str) -> int:
    if name not in CLASSES:
        raise RareaugError(f"unknown Fashion-MNIST class {name!r}; use one of {', '.join(CLASSES)}")
    return CLASSES.index(name)


def _read_idx(path: Path) -> np.ndarray:
    # The IDX format is four header fields and raw bytes; no listed dependency reads it (torchvision's reader
    # wants its own download layout), so it is read here.
    try:
        data = gzip.open(path).read()
    except (OSError, EOFError) as error:
        raise RareaugError(f"{path}: unreadable ({error}); reinstall dataset-fashion-mnist") from error
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise RareaugError(f"{path}: not an IDX file of unsigned bytes; reinstall dataset-fashion-mnist")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise RareaugError(f"{path}: truncated ({body.size} bytes for shape {shape}); reinstall dataset-fashion-mnist")
    return body.reshape(shape)


def pad32(image: np.ndarray) -> np.ndarray:
    """28 x 28 -> 32 x 32 with Fashion-MNIST's own black background: the frame the mini model was trained in."""
    return np.pad(image, 2)


def write_class_folders(out: Path, split: str, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> int:
    """Write images as out/<class>/fm-<split>-<index>.png (32 px, grey); existing files are kept. Returns the count."""
    from PIL import Image

    written = 0
    for index in indices.tolist():
        path = out / CLASSES[labels[index]] / f"fm-{split}-{index:05d}.png"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        Image.fromarray(pad32(images[index])).save(partial, format="PNG", optimize=True)
        partial.replace(path)
        written += 1
    return written


def seeded_subset(labels: np.ndarray, counts: dict[str, int], seed: int) -> np.ndarray:
    """Indices of `counts[class]` images per class, drawn with a seeded generator (sorted, so folders are stable)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for name, count in counts.items():
        pool = np.flatnonzero(labels == class_index(name))
        if count > len(pool):
            raise RareaugError(f"Fashion-MNIST has {len(pool)} {name} images; {count} were asked for")
        chosen.append(np.sort(rng.choice(pool, size=count, replace=False)))
    return np.concatenate(chosen)

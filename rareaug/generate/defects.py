"""Synthetic defects pasted onto normal images, with the mask of every changed pixel: CutPaste (Li et al. 2021)
and DRAEM's Perlin-noise anomalies (Zavrtanik et al. 2021).

Pure functions: tensors in, tensors out, every random draw from the caller's `numpy.random.Generator` (one per
pool slot and attempt), so a slot regenerates alone, bitwise identically. The image equals `normal` exactly
wherever the mask is 0, so the mask is an honest pixel label for segmentation or for judging a detector.
"""
from __future__ import annotations

import math

import numpy as np
import torch

RECTANGLE_AREA = (0.02, 0.15)  # CutPaste: share of the image a random rectangle covers
RECTANGLE_ASPECT = (0.3, 3.3)  # CutPaste: width / height of a random rectangle
BRIGHTNESS = 0.1  # the pasted patch's brightness is scaled within +-10%
PASTE_ALPHA = (0.7, 1.0)
PERLIN_THRESHOLD = 0.5  # DRAEM's threshold on noise scaled by sqrt(2), as its rand_perlin_2d returns
PERLIN_MAX_EXPONENT = 6  # DRAEM: 2 ** [0, 6) lattice cells per axis at 256 px
PERLIN_MIN_CELL = 8  # pixels per lattice cell at the finest scale: 256 px / 2**5, so small images get coarser noise
PERLIN_BETA = (0.0, 0.8)  # DRAEM: the share of the normal image kept inside the anomaly
PERLIN_TRIES = 1000  # draws of a mask before giving up; an empty one is rare, a thousand in a row never seen


def cutpaste(normal: torch.Tensor, donor: torch.Tensor, donor_mask: torch.Tensor | None,
             rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a piece of `donor` onto `normal`: its defect region when `donor_mask` marks one (the output mask is
    the defect's own shape), else a random rectangle (CutPaste's own recipe, whole rectangle as mask).

    Args:
        normal: (3, H, W) float in [0, 1], the image that receives the patch.
        donor: (3, H, W) float in [0, 1], the image the patch is cut from.
        donor_mask: (H, W) float or bool, nonzero on the donor's defect; None or empty for a random rectangle.
        rng: the only source of randomness.

    Returns:
        The image (3, H, W) float32 in [0, 1] and its mask (H, W) float32 of 0.0 / 1.0, never empty.
    """
    _check_images(normal=normal, donor=donor)
    # 1. Cut the patch and its own mask.
    if donor_mask is not None:
        _check_mask(donor_mask, normal)
    if donor_mask is not None and bool(donor_mask.any()):
        patch, patch_mask = _defect_patch(donor, donor_mask != 0)
    else:
        patch, patch_mask = _random_rectangle(donor, rng)
    # 2. Jitter it lightly, so one real defect gives many pastes.
    patch, patch_mask = _jitter(patch, patch_mask, tuple(normal.shape[1:]), rng)
    # 3. Place it fully inside the image.
    height, width = patch_mask.shape
    top = int(rng.integers(0, normal.shape[1] - height + 1))
    left = int(rng.integers(0, normal.shape[2] - width + 1))
    rows, cols = slice(top, top + height), slice(left, left + width)
    # 4. The "blend": a little of the normal image shows through, so the paste's edges are less abrupt.
    alpha = float(rng.uniform(*PASTE_ALPHA))
    normal = normal.float()
    pasted = normal.clone()
    pasted[:, rows, cols] = alpha * patch + (1 - alpha) * normal[:, rows, cols]
    mask = torch.zeros(normal.shape[1:], dtype=torch.bool)
    mask[rows, cols] = patch_mask
    return torch.where(mask, pasted.clamp(0, 1), normal), mask.float()


def perlin(normal: torch.Tensor, texture: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM's anomaly: `texture` shows through `normal` where thresholded Perlin noise is high.

    Args:
        normal: (3, H, W) float in [0, 1], the image that receives the anomaly.
        texture: (3, H, W) float in [0, 1], the anomaly's source (DRAEM uses DTD textures).
        rng: the only source of randomness.

    Returns:
        The image (3, H, W) float32 in [0, 1] and its mask (H, W) float32 of 0.0 / 1.0, never empty.
    """
    _check_images(normal=normal, texture=texture)
    height, width = normal.shape[1:]
    mask = perlin_mask(height, width, rng)
    beta = float(rng.uniform(*PERLIN_BETA))
    normal = normal.float()
    # DRAEM: normal * (1 - m) + (1 - beta) * texture * m + beta * normal * m; the first term is `where`'s else.
    blended = (1 - beta) * texture.float() + beta * normal
    return torch.where(mask, blended.clamp(0, 1), normal), mask.float()


def perlin_mask(height: int, width: int, rng: np.random.Generator) -> torch.Tensor:
    """A non-empty (H, W) bool mask of blobs: Perlin noise at a random scale and angle, thresholded. Empty draws
    are redrawn from the same generator, so the result is still a function of its state."""
    for _ in range(PERLIN_TRIES):
        scale_y, scale_x = (2 ** int(rng.integers(0, _max_exponent(size))) for size in (height, width))
        angle = float(rng.uniform(-math.pi / 2, math.pi / 2))  # DRAEM rotates its noise by -90..90 degrees
        mask = perlin_noise(height, width, scale_y, scale_x, angle, rng) > PERLIN_THRESHOLD
        if mask.any():
            return torch.from_numpy(mask)
    raise RuntimeError(f"no Perlin mask above {PERLIN_THRESHOLD} in {PERLIN_TRIES} draws at {height}x{width}")


def perlin_noise(height: int, width: int, cells_y: int, cells_x: int, angle: float,
                 rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin (gradient) noise, (H, W) float64 in about [-1, 1], with `cells_y` x `cells_x` lattice cells
    across the image, sampled on a pixel grid rotated by `angle` radians.

    Written here rather than imported: anomalib has a Perlin generator but installing it pulls its whole
    Lightning training stack, and PyPI's Perlin packages are unmaintained (noise: last release 2015, a C
    extension), per-point pure Python (perlin-noise), or placeholders. Rotating the sample points instead of
    the noise image needs no interpolation and leaves no empty corners.
    """
    # Pixel centres in lattice units, rotated about the image centre, shifted to start at 0.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ys, xs = (ys + 0.5) * cells_y / height, (xs + 0.5) * cells_x / width
    ys, xs = ys - cells_y / 2, xs - cells_x / 2
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * xs - sin * ys, sin * xs + cos * ys
    u, v = u - u.min(), v - v.min()
    col, row = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fx, fy = u - col, v - row
    # A random unit gradient at each lattice corner; each corner contributes its gradient's dot product with
    # the offset to the point, blended by the quintic fade 6t^5 - 15t^4 + 10t^3 (Perlin 2002).
    directions = rng.uniform(0, 2 * math.pi, size=(row.max() + 2, col.max() + 2))
    grad_x, grad_y = np.cos(directions), np.sin(directions)

    def corner(dy: int, dx: int) -> np.ndarray:
        return grad_x[row + dy, col + dx] * (fx - dx) + grad_y[row + dy, col + dx] * (fy - dy)

    wx, wy = (t * t * t * (t * (6 * t - 15) + 10) for t in (fx, fy))
    top = corner(0, 0) + wx * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + wx * (corner(1, 1) - corner(1, 0))
    return math.sqrt(2) * (top + wy * (bottom - top))


def _max_exponent(size: int) -> int:
    """Exclusive bound on the lattice exponent: DRAEM's 2 ** [0, 6) at 256 px, fewer cells on smaller images so
    no cell is under `PERLIN_MIN_CELL` pixels (32 px: 1, 2 or 4 cells)."""
    return max(1, min(PERLIN_MAX_EXPONENT, int(math.log2(max(size / PERLIN_MIN_CELL, 1))) + 1))


def _defect_patch(donor: torch.Tensor, defect: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The defect's bounding box and, inside it, the defect's own pixels."""
    rows, cols = torch.nonzero(defect, as_tuple=True)
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    return donor[:, top:bottom, left:right].float(), defect[top:bottom, left:right]


def _random_rectangle(donor: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste's rectangle: 2-15% of the image, aspect ratio 0.3-3.3 drawn on a log scale (so tall and wide
    are equally likely), from a random place in the donor."""
    height, width = donor.shape[1:]
    area = rng.uniform(*RECTANGLE_AREA) * height * width
    aspect = math.exp(rng.uniform(math.log(RECTANGLE_ASPECT[0]), math.log(RECTANGLE_ASPECT[1])))
    box_h = min(height, max(1, round(math.sqrt(area / aspect))))
    box_w = min(width, max(1, round(math.sqrt(area * aspect))))
    top = int(rng.integers(0, height - box_h + 1))
    left = int(rng.integers(0, width - box_w + 1))
    return donor[:, top:top + box_h, left:left + box_w].float(), torch.ones(box_h, box_w, dtype=torch.bool)


def _jitter(patch: torch.Tensor, patch_mask: torch.Tensor, image_size: tuple[int, int],
            rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random flip, a quarter turn that still fits the image (so nothing is clipped and the defect keeps every
    pixel) and a brightness change within +-BRIGHTNESS."""
    if rng.random() < 0.5:
        patch, patch_mask = patch.flip(-1), patch_mask.flip(-1)
    height, width = patch_mask.shape
    turns_that_fit = [0, 2] + ([1, 3] if width <= image_size[0] and height <= image_size[1] else [])
    turns = turns_that_fit[int(rng.integers(0, len(turns_that_fit)))]
    patch, patch_mask = patch.rot90(turns, dims=(-2, -1)), patch_mask.rot90(turns, dims=(-2, -1))
    brightness = float(rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS))
    return (patch * brightness).clamp(0, 1), patch_mask


def _check_images(**images: torch.Tensor) -> None:
    """Every image is (3, H, W), all of one size: the caller resizes donors and textures to the normal image."""
    sizes = {}
    for name, image in images.items():
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"{name}: shape {tuple(image.shape)} is not (3, H, W); repeat a grayscale channel "
                             "three times")
        sizes[name] = tuple(image.shape[1:])
    if len(set(sizes.values())) > 1:
        raise ValueError(f"images differ in size ({sizes}); resize them to the normal image's size first")


def _check_mask(mask: torch.Tensor, normal: torch.Tensor) -> None:
    if tuple(mask.shape) != tuple(normal.shape[1:]):
        raise ValueError(f"donor_mask: shape {tuple(mask.shape)} is not the image's (H, W) "
                         f"{tuple(normal.shape[1:])}; pass one mask channel at the image's size")

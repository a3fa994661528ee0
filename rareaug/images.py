"""Bring a decoded image to the model's square input by the recipe's crop rule."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_adapters import decode, load_mask, mask_box


def square_region(width: int, height: int, rule: str, box: tuple[int, int, int, int] | None = None):
    """The square (x0, y0, side) to cut; for `pad` the side exceeds the image and the rest is padding.

    mask-box: the largest square that keeps the defect's box in view, centred on it where the image
    allows: one fixed crop per image, the same for every method. (ChimeraLoRA's semantic boosting is not
    this crop but `boost_squares`: many crops per image, for the shared A only.)
    """
    if rule == "pad":
        side = max(width, height)
        return (width - side) // 2, (height - side) // 2, side
    side = min(width, height)
    if rule == "mask-box" and box is not None:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        x0 = int(round(min(max(cx - side / 2, 0), width - side)))
        y0 = int(round(min(max(cy - side / 2, 0), height - side)))
        return x0, y0, side
    return (width - side) // 2, (height - side) // 2, side


def model_input(path: Path, resolution: int, crop: str, fallback: str = "center", mask: Path | None = None,
                frame: int = 0) -> torch.Tensor:
    """(3, resolution, resolution) float32 in [-1, 1], the range the VAE was trained on."""
    return _cut(path, resolution, crop, fallback, mask, frame, with_mask=False)[0]


def model_input_with_mask(path: Path, resolution: int, crop: str, fallback: str = "center", mask: Path | None = None,
                          frame: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`model_input` and the mask cut the same way: (resolution, resolution) float32 of 0 and 1 (a pixel is
    defect where any of it was, so a crack a pixel wide survives a downscale), or None without a mask file of the
    image's size."""
    return _cut(path, resolution, crop, fallback, mask, frame, with_mask=True)


def _cut(path: Path, resolution: int, crop: str, fallback: str, mask: Path | None, frame: int, with_mask: bool):
    pixels = decode(path, frame=frame).pixels  # (C, H, W) in [0, 1]
    _, height, width = pixels.shape
    mask_array = None
    if (with_mask or crop == "mask-box") and mask is not None and mask.is_file():
        mask_array = load_mask(mask)
        if mask_array.shape != (height, width):
            mask_array = None
    box = mask_box(mask_array) if crop == "mask-box" and mask_array is not None else None
    rule = crop if (crop != "mask-box" or box is not None) else fallback
    x0, y0, side = square_region(width, height, rule, box)
    image = _to_model_range(_square(torch.from_numpy(np.ascontiguousarray(pixels)), x0, y0, side), resolution)
    if not with_mask or mask_array is None:
        return image, None
    cut = _square(torch.from_numpy(mask_array)[None].float(), x0, y0, side)
    resized = F.interpolate(cut[None], size=(resolution, resolution), mode="area")[0, 0]
    return image, (resized > 0).float()


def boost_squares(width: int, height: int, box: tuple[int, int, int, int], count: int,
                  generator: torch.Generator) -> list[tuple[int, int, int]]:
    """ChimeraLoRA's semantic boosting: `count` random squares (x0, y0, side) that each hold the whole box.

    The side is uniform from the smallest square holding the box to the largest square inside the image,
    then the position uniform among those that keep the box whole and stay inside the image. A box longer
    than the image's short side fits no square inside it: the side then runs up to the long side and the
    square reaches past the short one, whose overflow is black padding (as the `pad` rule's).
    """
    bx0, by0, bx1, by1 = box
    smallest = max(bx1 - bx0, by1 - by0)
    largest = min(width, height) if smallest <= min(width, height) else max(width, height)

    def uniform(low: int, high: int) -> int:  # inclusive
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    squares = []
    for _ in range(count):
        side = uniform(smallest, largest)
        x0 = uniform(max(bx1 - side, min(0, width - side)), min(bx0, max(0, width - side)))
        y0 = uniform(max(by1 - side, min(0, height - side)), min(by0, max(0, height - side)))
        squares.append((x0, y0, side))
    return squares


def boosted_inputs(path: Path, mask: Path | None, resolution: int, count: int, generator: torch.Generator,
                   frame: int = 0) -> list[torch.Tensor]:
    """The image's `boost_squares` views as model inputs (see `model_input`); none without a mask file of the
    image's size or with an empty mask, where semantic boosting falls back to the standard crop."""
    if mask is None or not mask.is_file():
        return []
    pixels = torch.from_numpy(np.ascontiguousarray(decode(path, frame=frame).pixels))
    _, height, width = pixels.shape
    mask_array = load_mask(mask)
    box = mask_box(mask_array) if mask_array.shape == (height, width) else None
    if box is None:
        return []
    return [_to_model_range(_square(pixels, x0, y0, side), resolution)
            for x0, y0, side in boost_squares(width, height, box, count, generator)]


def _square(pixels: torch.Tensor, x0: int, y0: int, side: int) -> torch.Tensor:
    """The square [x0, x0 + side) x [y0, y0 + side) of (C, H, W) pixels; what lies outside the image is black."""
    _, height, width = pixels.shape
    if x0 >= 0 and y0 >= 0 and x0 + side <= width and y0 + side <= height:
        return pixels[:, y0:y0 + side, x0:x0 + side]
    canvas = torch.zeros((pixels.shape[0], side, side), dtype=pixels.dtype)
    left, top, right, bottom = max(x0, 0), max(y0, 0), min(x0 + side, width), min(y0 + side, height)
    canvas[:, top - y0:bottom - y0, left - x0:right - x0] = pixels[:, top:bottom, left:right]
    return canvas


def _to_model_range(tensor: torch.Tensor, resolution: int) -> torch.Tensor:
    tensor = F.interpolate(tensor[None], size=(resolution, resolution), mode="bilinear", antialias=True,
                           align_corners=False)[0].clamp(0, 1)
    if tensor.shape[0] == 1:  # the VAE takes three channels; grayscale becomes grey RGB here, not before
        tensor = tensor.expand(3, -1, -1)
    return tensor * 2.0 - 1.0

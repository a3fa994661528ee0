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
    allows (ChimeraLoRA's "semantic boosting" without a detector: the mask is the box).
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
    pixels = decode(path, frame=frame).pixels  # (C, H, W) in [0, 1]
    _, height, width = pixels.shape
    box = None
    if crop == "mask-box" and mask is not None and mask.is_file():
        mask_array = load_mask(mask)
        if mask_array.shape == (height, width):
            box = mask_box(mask_array)
    rule = crop if (crop != "mask-box" or box is not None) else fallback
    x0, y0, side = square_region(width, height, rule, box)
    tensor = torch.from_numpy(np.ascontiguousarray(pixels))
    if rule == "pad":
        canvas = torch.zeros((tensor.shape[0], side, side), dtype=tensor.dtype)
        canvas[:, -y0:-y0 + height, -x0:-x0 + width] = tensor
        tensor = canvas
    else:
        tensor = tensor[:, y0:y0 + side, x0:x0 + side]
    tensor = F.interpolate(tensor[None], size=(resolution, resolution), mode="bilinear", antialias=True,
                           align_corners=False)[0].clamp(0, 1)
    if tensor.shape[0] == 1:  # the VAE takes three channels; grayscale becomes grey RGB here, not before
        tensor = tensor.expand(3, -1, -1)
    return tensor * 2.0 - 1.0

"""The `classic` baseline: extra copies of the real rare train images made with albumentations, using only
the changes the recipe calls safe (no horizontal flip for chest X-rays, every flip for tiles)."""
from __future__ import annotations

import albumentations as A
import numpy as np
import torch

from ..config import AugmentConfig


def classic_transform(augment: AugmentConfig, seed: int) -> A.Compose:
    """One seeded pipeline per image, so each copy regenerates alone, identically."""
    steps = [A.Affine(rotate=(-augment.rotate_degrees, augment.rotate_degrees), scale=(0.9, 1.1),
                      translate_percent=(-0.05, 0.05), border_mode=1, p=1.0)]  # reflect the border, no black wedges
    if augment.hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if augment.vflip:
        steps.append(A.VerticalFlip(p=0.5))
    if augment.elastic:
        steps.append(A.ElasticTransform(alpha=30, sigma=6, border_mode=1, p=0.5))
    if augment.brightness_contrast > 0:
        limit = augment.brightness_contrast
        steps.append(A.RandomBrightnessContrast(brightness_limit=limit, contrast_limit=limit, p=0.8))
    if augment.noise > 0:
        steps.append(A.GaussNoise(std_range=(augment.noise / 2, augment.noise), p=0.5))
    return A.Compose(steps, seed=seed)


def classic_copy(image: torch.Tensor, augment: AugmentConfig, seed: int) -> torch.Tensor:
    """image: (3, H, W) in [0, 1] -> an augmented copy, same shape and range."""
    array = image.permute(1, 2, 0).numpy().astype(np.float32)
    out = classic_transform(augment, seed)(image=array)["image"]
    return torch.from_numpy(np.clip(out, 0, 1)).permute(2, 0, 1).contiguous()

"""Memorization guard: how close is each synthetic image to its nearest real training image?

The default distance, 1 - SSIM on a 64x64 grayscale copy (MONAI's SSIM), needs no downloaded weights.
LPIPS (AlexNet) is an option when its weights are on this machine. The threshold is calibrated on the
real images themselves: the 5th percentile of each real image's distance to its nearest other real image
(exact duplicates ignored) — a synthetic image closer to a real one than real images usually are to each
other is treated as a copy.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RareaugError

GUARD_SIZE = 64
CALIBRATION_PERCENTILE = 5.0
EXACT_DUPLICATE = 1e-6


class Guard:
    """Distances from images to a fixed set of real images, and the calibrated threshold."""

    def __init__(self, reals: torch.Tensor, real_ids: list[str], distance: str = "ssim",
                 threshold: float | None = None, device: torch.device = torch.device("cpu")):
        """reals: (N, C, H, W) in [0, 1]."""
        if distance not in ("ssim", "lpips"):
            raise RareaugError(f"--guard-distance {distance!r} is unknown; use ssim or lpips")
        self.distance, self.device, self.real_ids = distance, device, real_ids
        self._lpips = _load_lpips(device) if distance == "lpips" else None
        self.reals = self._prepare(reals)
        self.threshold = self.calibrate() if threshold is None else float(threshold)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if self.distance == "ssim":
            images = images.mean(dim=1, keepdim=True)  # grayscale: colour shifts do not hide a copy
        return F.interpolate(images, size=(GUARD_SIZE, GUARD_SIZE), mode="area").to(self.device)

    def distances(self, images: torch.Tensor, reals: torch.Tensor | None = None) -> torch.Tensor:
        """(n_images, n_reals) distances."""
        images = self._prepare(images) if reals is None else images
        reals = self.reals if reals is None else reals
        n, m = images.shape[0], reals.shape[0]
        left = images.repeat_interleave(m, dim=0)
        right = reals.repeat(n, 1, 1, 1)
        if self.distance == "ssim":
            from monai.metrics.regression import compute_ssim_and_cs

            ssim, _ = compute_ssim_and_cs(left, right, spatial_dims=2, kernel_size=[7, 7], kernel_sigma=[1.5, 1.5],
                                          data_range=1.0)
            values = 1.0 - ssim.reshape(n * m, -1).mean(dim=1)
        else:
            with torch.no_grad():
                values = self._lpips(_three(left) * 2 - 1, _three(right) * 2 - 1).reshape(-1)
        return values.reshape(n, m).cpu()

    def nearest(self, images: torch.Tensor) -> tuple[list[str], list[float]]:
        distances = self.distances(images)
        best = distances.argmin(dim=1)
        return [self.real_ids[int(i)] for i in best], [float(distances[k, i]) for k, i in enumerate(best)]

    def calibrate(self) -> float:
        """5th percentile of each real image's distance to its nearest other (non-identical) real image."""
        if self.reals.shape[0] < 2:
            raise RareaugError("the memorization guard needs at least 2 real training images to calibrate; "
                               "set --guard-threshold or use --no-guard")
        distances = self.distances(self.reals, self.reals).numpy()
        np.fill_diagonal(distances, np.inf)
        distances[distances < EXACT_DUPLICATE] = np.inf
        nearest = distances.min(axis=1)
        nearest = nearest[np.isfinite(nearest)]
        if nearest.size == 0:
            raise RareaugError("every real training image is an exact duplicate of another; set --guard-threshold")
        return float(np.percentile(nearest, CALIBRATION_PERCENTILE))


def _three(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _load_lpips(device: torch.device):
    """LPIPS with AlexNet; its backbone weights come from the torchvision cache, never downloaded here."""
    import os

    import lpips
    from torch.hub import get_dir

    backbone = os.path.join(get_dir(), "checkpoints", "alexnet-owt-7be5be79.pth")
    if not os.path.exists(backbone):
        raise RareaugError(f"LPIPS needs the AlexNet weights at {backbone} (torchvision cache); copy them there "
                           "or use --guard-distance ssim")
    return lpips.LPIPS(net="alex", verbose=False).to(device).eval()

"""Memorization guard: is a synthetic image a near-copy of one real training image?

The distance is 1 - SSIM on a 64x64 grayscale copy (MONAI's SSIM; no downloaded weights), or LPIPS (AlexNet;
its backbone is downloaded into torchvision's cache on first use unless the machine is offline). Before the
distance is taken, each synthetic image is aligned to each real one: shifts of up to `SHIFT_PIXELS` pixels at the
images' own resolution are searched by normalised cross-correlation, so a copy moved by a pixel or two is still a
copy.

Rules (`--guard-rule`):
- `relative` (default), after Carlini et al. (2023, "Extracting training data from diffusion models"): an
  image is a near-copy when its distance to its nearest real image is under `ratio` (default 0.5) times its
  mean distance to the next `NEIGHBOURS` nearest real images. It judges an image against the data's own spread,
  so it works on smooth images (garments, radiographs), where real images sit close to each other, and on
  textures, where every real image is far from every other.
- image-to-image: an image made from real image s is meant to be near s, so it is judged against the *other*
  real images only (the same rule, one fewer real image), and its distance to s is recorded on its own.
- `absolute`: under a fixed distance (`--guard-threshold`, or the 5th percentile of each real image's distance
  to its nearest other real image). On textures that percentile is near the distance of unrelated images,
  so nearly everything counts as a copy; it is kept for comparability with earlier runs.
Calibration on Fashion-MNIST, radiograph and texture crops: `bench/guard_calibration.py` (results in
`bench/results/guard-calibration.json`).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RareaugError
from ..perceptual import load_lpips

GUARD_SIZE = 64
SHIFT_PIXELS = 2  # a copy shifted by up to this many pixels (at the images' resolution) is still a copy
NEIGHBOURS = 5  # relative rule: the nearest real image is compared with the mean of the next ones
DEFAULT_RATIO = 0.5
CALIBRATION_PERCENTILE = 5.0
EXACT_DUPLICATE = 1e-6
RULES = ("relative", "absolute")
_CHUNK = 32  # synthetic images aligned at a time: bounds the memory of the shifted crops


@dataclasses.dataclass
class Judgement:
    """Per image: its nearest real image, the distance to it, the rule's score and whether it is a near-copy.
    The score is the distance ratio (relative rule) or the distance itself (absolute rule)."""

    nearest_ids: list[str]
    distances: list[float]
    scores: list[float]
    copies: list[bool]
    source_distances: list[float] | None = None  # image-to-image: the distance to the image's own source


class Guard:
    """Distances from images to a fixed set of real images, and the rule that calls an image a near-copy."""

    def __init__(self, reals: torch.Tensor, real_ids: list[str], distance: str = "ssim", rule: str = "relative",
                 ratio: float = DEFAULT_RATIO, threshold: float | None = None,
                 device: torch.device = torch.device("cpu"), leave_source_out: bool = False):
        """reals: (N, C, H, W) in [0, 1], at the resolution synthetic images will have. leave_source_out:
        image-to-image; `judge` is given each image's source, which is left out of its judgement."""
        if distance not in ("ssim", "lpips"):
            raise RareaugError(f"--guard-distance {distance!r} is unknown; use ssim or lpips")
        if rule not in RULES:
            raise RareaugError(f"--guard-rule {rule!r} is unknown; use relative or absolute")
        self.distance, self.rule, self.ratio, self.device, self.real_ids = (
            distance, rule, float(ratio), device, real_ids)
        self.leave_source_out = leave_source_out
        self.shift = math.ceil(SHIFT_PIXELS * GUARD_SIZE / max(reals.shape[-2:]))  # in guard pixels
        self._lpips = load_lpips(device, "use --guard-distance ssim") if distance == "lpips" else None
        self.reals = self._prepare(reals)
        self.threshold = None
        if rule == "absolute":
            self.threshold = self.calibrate() if threshold is None else float(threshold)

    @property
    def description(self) -> str:
        """One phrase for logs and reasons: what counts as a near-copy in this run."""
        if self.rule == "relative":
            return (f"nearest real image closer than {self.ratio:g} x the mean distance to the next "
                    f"{self.neighbours} ({self.distance})")
        return f"{self.distance} distance under {self.threshold:.4f}"

    @property
    def neighbours(self) -> int:
        """The real images the relative rule compares the nearest one with (each image's source left out
        under image-to-image)."""
        return max(min(NEIGHBOURS, self.reals.shape[0] - 1 - self.leave_source_out), 0)

    def record(self) -> dict:
        """What summary.json keeps of the guard, so a run says which distance and rule judged its pool."""
        return {"guard_rule": self.rule, "guard_distance": self.distance,
                "guard_ratio": self.ratio if self.rule == "relative" else None,
                "guard_neighbours": self.neighbours if self.rule == "relative" else None,
                "guard_threshold": self.threshold, "guard_shift_pixels": SHIFT_PIXELS, "guard_size": GUARD_SIZE}

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if self.distance == "ssim":
            images = images.mean(dim=1, keepdim=True)  # grayscale: colour shifts do not hide a copy
        return F.interpolate(images, size=(GUARD_SIZE, GUARD_SIZE), mode="area").to(self.device)

    def distances(self, images: torch.Tensor, reals: torch.Tensor | None = None) -> torch.Tensor:
        """(n_images, n_reals) distances after alignment; `images` raw unless `reals` is given (both prepared)."""
        images = self._prepare(images) if reals is None else images
        reals = self.reals if reals is None else reals
        return torch.cat([self._distances(chunk, reals) for chunk in images.split(_CHUNK)]).cpu()

    def _distances(self, images: torch.Tensor, reals: torch.Tensor) -> torch.Tensor:
        n, m = images.shape[0], reals.shape[0]
        left, right = _aligned_pairs(images, reals, self.shift)
        if self.distance == "ssim":
            from monai.metrics.regression import compute_ssim_and_cs

            ssim, _ = compute_ssim_and_cs(left, right, spatial_dims=2, kernel_size=[7, 7], kernel_sigma=[1.5, 1.5],
                                          data_range=1.0)
            values = 1.0 - ssim.reshape(n * m, -1).mean(dim=1)
        else:
            with torch.no_grad():
                values = self._lpips(_three(left) * 2 - 1, _three(right) * 2 - 1).reshape(-1)
        return values.reshape(n, m)

    def judge(self, images: torch.Tensor, sources: list[int] | None = None) -> Judgement:
        """sources (with leave_source_out): per image, the index of the real image it was made from, left out
        of the judgement and measured on its own."""
        if (sources is not None) != self.leave_source_out:
            raise ValueError("give each image's source exactly when the guard leaves sources out")
        distances = self.distances(images)
        source_distances = None
        neighbours = self.neighbours
        if sources is not None:
            rows = torch.arange(len(sources))
            index = torch.as_tensor(sources)
            source_distances = distances[rows, index].tolist()
            distances[rows, index] = float("inf")
            if distances.shape[1] == 1:  # the source was the only real image: nothing else to be near
                return Judgement([""] * len(sources), [float("nan")] * len(sources),
                                 [float("nan")] * len(sources), [False] * len(sources), source_distances)
        ordered, order = distances.sort(dim=1)
        nearest = ordered[:, 0]
        if self.rule == "relative" and neighbours == 0:  # one real image to compare with: nothing to judge by
            scores, copies = torch.full_like(nearest, float("nan")), torch.zeros_like(nearest, dtype=torch.bool)
        elif self.rule == "relative":
            spread = ordered[:, 1:1 + neighbours].mean(dim=1)
            scores = torch.where(spread > EXACT_DUPLICATE, nearest / spread.clamp_min(EXACT_DUPLICATE),
                                 torch.zeros_like(nearest))  # reals all identical: any match is a copy
            copies = scores < self.ratio
        else:
            scores = nearest
            copies = nearest < self.threshold
        return Judgement([self.real_ids[int(i)] for i in order[:, 0]], nearest.tolist(), scores.tolist(),
                         copies.tolist(), source_distances)

    def calibrate(self) -> float:
        """Absolute rule: 5th percentile of each real image's distance to its nearest other (non-identical) one."""
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


def _aligned_pairs(images: torch.Tensor, reals: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (image, real) pair, the image's crop at the shift that best matches the real image's centre crop
    (normalised cross-correlation over shifts of up to `shift` pixels), and that centre crop: (n*m, C, S, S) each.
    Written here because the SSIM and LPIPS libraries compare images in place; a search of the distance itself
    over every shift would cost (2*shift + 1)^2 distances per pair instead of one."""
    n, m = images.shape[0], reals.shape[0]
    if shift == 0:
        return images.repeat_interleave(m, dim=0), reals.repeat(n, 1, 1, 1)
    channels, size = images.shape[1], images.shape[-1] - 2 * shift
    crops = F.unfold(images, kernel_size=size)  # (n, C*S*S, shifts), shifts in row-major order of (dy, dx)
    centres = reals[:, :, shift:shift + size, shift:shift + size].reshape(m, -1)
    correlation = torch.einsum("nks,mk->nms", _standardised(crops, dim=1), _standardised(centres, dim=1))
    centre = (2 * shift + 1) * shift + shift
    correlation[:, :, centre] += 1e-4  # ties (flat images) keep the unshifted crop
    best = correlation.argmax(dim=2)  # (n, m)
    chosen = torch.gather(crops, 2, best.unsqueeze(1).expand(-1, crops.shape[1], -1))  # (n, C*S*S, m)
    left = chosen.permute(0, 2, 1).reshape(n * m, channels, size, size)
    right = centres.reshape(m, channels, size, size).repeat(n, 1, 1, 1)
    return left, right


def _standardised(values: torch.Tensor, dim: int) -> torch.Tensor:
    centred = values - values.mean(dim=dim, keepdim=True)
    return centred / centred.norm(dim=dim, keepdim=True).clamp_min(1e-8)


def _three(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


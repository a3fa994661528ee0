"""Diversity of a synthetic set: mean pairwise LPIPS (AlexNet) and intra-cluster LPIPS (each image assigned to
its nearest real image; pairs within a cluster), the default; its backbone comes from torchvision's cache, or is
downloaded there on first use. When it is neither cached nor downloadable (offline, or the download failed), the
named fallback is mean pairwise 1 - MS-SSIM (torchmetrics), which needs no weights; `Measure.fallback_reason`
says why, for the caller to report. Every result names its metric."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RareaugError
from ..perceptual import load_lpips

MAX_PAIRS = 300
MS_SSIM_SIZE = 176  # five MS-SSIM scales with an 11-px window need at least 161 px
LPIPS_METRIC, FALLBACK_METRIC = "lpips_alex", "1-ms_ssim"


@dataclasses.dataclass
class Measure:
    """A distance between two image batches, the metric's name, and why it is the fallback (None if it is not)."""

    metric: str
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    fallback_reason: str | None = None


def diversity_measure() -> Measure:
    """LPIPS when its backbone is cached or may be downloaded now; else 1 - MS-SSIM, with the reason."""
    try:
        model = load_lpips("cpu")
    except RareaugError as error:
        return Measure(FALLBACK_METRIC, _ms_ssim_distance, str(error))

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(a * 2 - 1, b * 2 - 1).reshape(-1)

    return Measure(LPIPS_METRIC, distance)


def _ms_ssim_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    a = F.interpolate(a, size=(MS_SSIM_SIZE, MS_SSIM_SIZE), mode="bilinear", antialias=True)
    b = F.interpolate(b, size=(MS_SSIM_SIZE, MS_SSIM_SIZE), mode="bilinear", antialias=True)
    return torch.stack([1 - ms_ssim(a[i:i + 1], b[i:i + 1], data_range=1.0) for i in range(a.shape[0])])


def _pairs(n: int, seed: int) -> list[tuple[int, int]]:
    pairs = list(itertools.combinations(range(n), 2))
    if len(pairs) > MAX_PAIRS:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in rng.choice(len(pairs), MAX_PAIRS, replace=False)]
    return pairs


def diversity(images: torch.Tensor, reals: torch.Tensor, seed: int = 0, measure: Measure | None = None) -> dict:
    """images, reals: (n, 3, H, W) in [0, 1]. Returns diversity, diversity_metric, intra_cluster.

    measure: from `diversity_measure()`, made once by a caller that measures several sets (LPIPS loads once).
    """
    if images.shape[0] < 2:
        return {"diversity": float("nan"), "diversity_metric": "", "intra_cluster": float("nan")}
    measure = measure or diversity_measure()
    distance = measure.distance
    pairs = _pairs(images.shape[0], seed)
    left = images[[i for i, _ in pairs]]
    right = images[[j for _, j in pairs]]
    mean_pairwise = float(distance(left, right).mean())
    intra = float("nan")
    if measure.metric == LPIPS_METRIC:
        # Nearest real image of each synthetic one, by the same distance; then pairs within clusters.
        to_real = torch.stack([distance(images[i:i + 1].expand(reals.shape[0], -1, -1, -1), reals)
                               for i in range(images.shape[0])])
        cluster = to_real.argmin(dim=1).tolist()
        within = [(i, j) for i, j in itertools.combinations(range(images.shape[0]), 2) if cluster[i] == cluster[j]]
        if within:
            within = within[:MAX_PAIRS]
            intra = float(distance(images[[i for i, _ in within]], images[[j for _, j in within]]).mean())
    return {"diversity": mean_pairwise, "diversity_metric": measure.metric, "intra_cluster": intra}

"""Diversity of a synthetic set: mean pairwise LPIPS (AlexNet) and intra-cluster LPIPS (each image
assigned to its nearest real image; pairs within a cluster) when the AlexNet weights are in the local
torchvision cache; otherwise mean pairwise 1 - MS-SSIM (torchmetrics), which needs no weights."""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

MAX_PAIRS = 300
MS_SSIM_SIZE = 176  # five MS-SSIM scales with an 11-px window need at least 161 px


def lpips_available() -> bool:
    import os

    from torch.hub import get_dir

    return os.path.exists(os.path.join(get_dir(), "checkpoints", "alexnet-owt-7be5be79.pth"))


def _pairs(n: int, seed: int) -> list[tuple[int, int]]:
    pairs = list(itertools.combinations(range(n), 2))
    if len(pairs) > MAX_PAIRS:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in rng.choice(len(pairs), MAX_PAIRS, replace=False)]
    return pairs


def diversity(images: torch.Tensor, reals: torch.Tensor, seed: int = 0) -> dict:
    """images, reals: (n, 3, H, W) in [0, 1]. Returns diversity, diversity_metric, intra_cluster."""
    if images.shape[0] < 2:
        return {"diversity": float("nan"), "diversity_metric": "", "intra_cluster": float("nan")}
    if lpips_available():
        import lpips

        model = lpips.LPIPS(net="alex", verbose=False).eval()

        def distance(a, b):
            with torch.no_grad():
                return model(a * 2 - 1, b * 2 - 1).reshape(-1)

        metric = "lpips_alex"
    else:
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

        def distance(a, b):
            a = F.interpolate(a, size=(MS_SSIM_SIZE, MS_SSIM_SIZE), mode="bilinear", antialias=True)
            b = F.interpolate(b, size=(MS_SSIM_SIZE, MS_SSIM_SIZE), mode="bilinear", antialias=True)
            return torch.stack([1 - ms_ssim(a[i:i + 1], b[i:i + 1], data_range=1.0) for i in range(a.shape[0])])

        metric = "1-ms_ssim"
    pairs = _pairs(images.shape[0], seed)
    left = images[[i for i, _ in pairs]]
    right = images[[j for _, j in pairs]]
    mean_pairwise = float(distance(left, right).mean())
    intra = float("nan")
    if metric == "lpips_alex":
        # Nearest real image of each synthetic one, by the same distance; then pairs within clusters.
        to_real = torch.stack([distance(images[i:i + 1].expand(reals.shape[0], -1, -1, -1), reals)
                               for i in range(images.shape[0])])
        cluster = to_real.argmin(dim=1).tolist()
        within = [(i, j) for i, j in itertools.combinations(range(images.shape[0]), 2) if cluster[i] == cluster[j]]
        if within:
            within = within[:MAX_PAIRS]
            intra = float(distance(images[[i for i, _ in within]], images[[j for _, j in within]]).mean())
    return {"diversity": mean_pairwise, "diversity_metric": metric, "intra_cluster": intra}

"""The mini model's quality gate: does it draw what it is asked, and does the prompt matter more than the seed?

The judge is `check.py`'s CNN trained on real images of all ten classes (the benchmark's ruler, unchanged).
Gate, at 25 sampling steps and guidance 3: each of the six classes the UNet was trained on is judged as asked
in >= 85% of its samples and >= 90% on average; and images of one seed under different prompts differ more
than images of one prompt under different seeds (otherwise the text conditioning is decoration).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...samples.fashion_mnist import COMMON_CLASSES, RARE_CLASSES
from . import PROMPT, RESOLUTION

GUIDANCE, STEPS = 3.0, 25
MIN_PER_CLASS, MIN_MEAN = 0.85, 0.90


def cached_judge():
    """check.py's judge, trained once per machine and kept as safetensors in the user cache (the ruler is
    deterministic but costs half a minute; the gate, the tests and the benchmarks all ask for it)."""
    import os

    from safetensors.torch import load_file, save_file

    from .check import train_judge

    cache = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rareaug"
             / "mini-judge-n20000-e2-s0.safetensors")
    judge = train_judge(n_images=0)  # the architecture only: 0 images, no step taken
    if cache.is_file():
        judge.load_state_dict(load_file(str(cache)))
        return judge.eval()
    judge = train_judge()
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(temporary))
    os.replace(temporary, cache)
    return judge


def load_for_sampling(folder: Path, device):
    from ..base import frozen_base_model
    from . import load_mini_components

    return frozen_base_model(load_mini_components(Path(folder)), str(folder), False, device, torch.float32)


def sample_class(base, name: str, seeds, device, guidance: float = GUIDANCE, steps: int = STEPS) -> torch.Tensor:
    """(len(seeds), 3, 32, 32) images in [0, 1] of `PROMPT` for one class, one seed each."""
    from ...generate.sampler import BankSampler, SampleRequest

    sampler = BankSampler(base, None, PROMPT.replace("{class}", name), guidance, steps, "default", device, RESOLUTION)
    return sampler.sample([SampleRequest([], [], [], seed) for seed in seeds]).cpu()


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Mean RMS pixel distance over all pairs of (n, ...) images."""
    flat = images.flatten(1).float()
    n = len(flat)
    distances = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    return float(distances.sum() / (n * (n - 1)))


def quality_gate(folder_or_base, device, n: int = 64, judge=None,
                 classes: tuple[str, ...] = (*COMMON_CLASSES, *RARE_CLASSES)) -> dict:
    """Judge `n` samples per class (seeds 0..n-1); the figures and whether the gate passed. The four rare
    classes are judged for the card (the UNet never drew them); the gate is about the six seen ones."""
    from .check import judge_images

    base = load_for_sampling(folder_or_base, device) if isinstance(folder_or_base, (str, Path)) else folder_or_base
    judge = judge or cached_judge()
    agreement, called, images = {}, {}, {}
    for name in classes:
        images[name] = sample_class(base, name, range(n), device)
        judged = judge_images(judge, images[name])
        agreement[name] = sum(j == name for j in judged) / n
        called[name] = {label: judged.count(label) / n for label in sorted(set(judged), key=judged.count, reverse=True)}
    common = torch.stack([images[name] for name in COMMON_CLASSES])  # (classes, seeds, 3, H, W)
    prompt_moves = sum(mean_pairwise_distance(common[:, s]) for s in range(n)) / n
    seed_moves = sum(mean_pairwise_distance(common[c]) for c in range(len(COMMON_CLASSES))) / len(COMMON_CLASSES)
    seen = [agreement[name] for name in COMMON_CLASSES]
    return {
        "samples_per_class": n, "guidance": GUIDANCE, "steps": STEPS,
        "agreement": agreement, "judged_as": called,
        "mean_seen": sum(seen) / len(seen), "min_seen": min(seen),
        "prompt_moves": prompt_moves, "seed_moves": seed_moves,
        "passed": min(seen) >= MIN_PER_CLASS and sum(seen) / len(seen) >= MIN_MEAN and prompt_moves > seed_moves,
        "rule": f"each seen class >= {MIN_PER_CLASS:.0%}, mean >= {MIN_MEAN:.0%}, prompt moves an image more than "
                f"the seed (mean RMS pixel distance)",
    }

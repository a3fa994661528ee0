"""Does the mini model draw what it is asked for? A small classifier trained on real Fashion-MNIST judges.

Used by the training script (the figure goes into the model card) and by the tests. The judge is a plain
two-layer CNN (about 91% test accuracy after two epochs), trained on real images of all ten classes, so a
generated "sneaker" has to look more like a real sneaker than like any of the nine other real classes.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...samples.fashion_mnist import CLASSES, load_fashion_mnist


def train_judge(n_images: int = 20000, epochs: int = 2, seed: int = 0) -> nn.Module:
    """A CNN on `n_images` real training images (seeded sample), for 28x28 inputs in [0, 1]."""
    images, labels = load_fashion_mnist("train")
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(images))[:n_images]
    x = torch.from_numpy(images[pick]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(labels[pick])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, len(CLASSES)),
        )
        optimizer = torch.optim.Adam(judge.parameters(), lr=2e-3)
        for _ in range(epochs):
            order = torch.randperm(len(x))
            for start in range(0, len(x), 128):
                batch = order[start:start + 128]
                loss = nn.functional.cross_entropy(judge(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return judge.eval()


@torch.no_grad()
def judge_images(judge: nn.Module, images: torch.Tensor) -> list[str]:
    """Class names for generated images (N, 3, 32, 32) in [0, 1]: grey level, centre 28x28 crop."""
    gray = images.float().mean(dim=1, keepdim=True)[:, :, 2:30, 2:30]
    return [CLASSES[i] for i in judge(gray).argmax(dim=1).tolist()]

"""Synthetic cracks drawn on real texture crops, for the shipped defect sample: a real photo has no defects of
its own, and a drawn crack's mask is exact (every changed pixel, nothing else)."""
from __future__ import annotations

import math

import numpy as np

STEP = 0.5  # pixels between points of the walk: small enough that discs of radius >= 0.75 overlap
TURN = 0.15  # radians: spread of the heading's change per step, the crack's wander
PULL = 0.05  # share of the heading's drift undone per step: cracks run on, they do not curl into loops
JAG = 0.5  # pixels: sideways jitter of each point, the crack's rough edge
DARKNESS = (0.3, 0.55)  # a crack keeps this share of the surface's brightness


def draw_crack(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark, wandering crack 1-3 pixels wide, thinner at its ends, sometimes with one branch.

    Args:
        image: (H, W) uint8 grayscale.
        rng: the only source of randomness.

    Returns:
        The cracked copy (H, W) uint8 and its mask (H, W) bool: exactly the pixels that were darkened.
    """
    height, width = image.shape
    start = rng.uniform(0.25, 0.75, size=2) * (height, width)
    heading = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(0.5, 0.9) * max(height, width)
    radius = rng.uniform(0.8, 1.5)
    # The walk goes both ways from a point well inside, so most of the crack lands in the crop.
    forward = _walk(start, heading, length / 2, rng)
    backward = _walk(start, heading + math.pi, length / 2, rng)
    path = np.concatenate([backward[::-1], forward[1:]])
    mask = _stroke(path, radius, (height, width))
    if rng.random() < 0.5:
        fork = path[int(rng.integers(len(path) // 4, 3 * len(path) // 4))]
        turn = rng.choice([-1, 1]) * rng.uniform(0.4, 1.0)
        mask |= _stroke(_walk(fork, heading + turn, length * rng.uniform(0.2, 0.4), rng), radius * 0.7,
                        (height, width))
    shade = rng.uniform(*DARKNESS) + rng.normal(0, 0.05, size=image.shape)
    cracked = image.astype(np.float64)
    cracked[mask] *= np.clip(shade[mask], 0.1, 0.9)
    return np.round(cracked).astype(np.uint8), mask


def _walk(start: np.ndarray, heading: float, length: float, rng: np.random.Generator) -> np.ndarray:
    """(N, 2) points (y, x) of a random walk whose heading wanders about its starting direction."""
    points = [np.asarray(start, dtype=np.float64)]
    direction = heading
    for _ in range(int(length / STEP)):
        direction += rng.normal(0, TURN) - PULL * (direction - heading)
        step = STEP * np.array([math.sin(direction), math.cos(direction)])
        points.append(points[-1] + step + rng.normal(0, JAG * STEP, size=2))
    return np.stack(points)


def _stroke(path: np.ndarray, radius: float, shape: tuple[int, int]) -> np.ndarray:
    """Discs along the path, widest in the middle and tapering to a hairline at the ends."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    mask = np.zeros(shape, dtype=bool)
    for index, (y, x) in enumerate(path):
        along = index / max(len(path) - 1, 1)
        r = max(0.75, radius * math.sin(math.pi * along) ** 0.5)
        mask |= (rows - y) ** 2 + (cols - x) ** 2 <= r * r
    return mask

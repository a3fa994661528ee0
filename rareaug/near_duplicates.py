"""Near-duplicate images: the same picture in two splits (a leak), in `--test-data` and `--data`, or in
`adapt --unlabeled` and the held-out images.

Two images are near-duplicates when their 16-px thumbnails, with brightness and contrast normalised
(1 - correlation), are far closer than the data's own typical pair: `CLOSER_THAN_TYPICAL` x the median distance
from an image to its second-nearest neighbour (the second, so that the copies being looked for do not pull the
yardstick down), clipped to [`PIXEL_FLOOR`, `PIXEL_CEILING`] and never above `AT_MOST_OF_TYPICAL` x that median:
data whose images are all nearly alike (aligned objects of one product) gets a threshold far under its typical
pair, not a floor that flags every pair. Flat thumbnails (blank images) carry nothing to leak and never match.

No perceptual hash: measured (`bench/near_duplicates.py`, results in bench/results/near_duplicates.json), a
JPEG re-encode moves a 64-bit pHash by up to 10 bits on 28-px Fashion-MNIST garments, up to 34 on 28-px photo
crops and up to 30 on 256-px radiograph crops (brightening them, up to 32), while distinct garments sit 2 bits
apart: no hash threshold separates copies from neighbours there. The calibrated pixel rule finds every planted
exact, JPEG q75 and x1.1-brightened copy of Fashion-MNIST (96-98% at JPEG q50 and x1.2) and flags none of its
3,000 distinct test images.

Written here because scikit-image and torchmetrics compare one pair at a time; this compares every pair of a
20,000-image data set in seconds with a few matrix products.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .split import SplitRow

CLOSER_THAN_TYPICAL = 0.06
PIXEL_FLOOR, PIXEL_CEILING = 0.0005, 0.015
AT_MOST_OF_TYPICAL = 0.25
FLAT_NORM = 16.0  # a thumbnail whose centred pixels have a norm under this (std < 1 grey level) is flat
CALIBRATION_PROBES = 1000
CHUNK = 256  # rows compared at once: 256 x 100k distances are 100 MB
FULL_CHECK_LIMIT = 20_000  # above this many images only the rare ones are compared with all
MAX_LISTED = 10_000  # pairs data.json lists (the closest); `pairs` in the rule counts them all
WHOLESALE_SHARE = 0.5  # more than this share of --test-data duplicating --data: a copy, not a test set


@dataclasses.dataclass(frozen=True)
class Pair:
    a: int  # indices into the thumbnails the index was built from
    b: int
    distance: float  # 1 - correlation of the thumbnails


class NearDuplicates:
    """The thumbnails of one data set and the distance under which two of them are copies, calibrated on them."""

    def __init__(self, thumbs: Sequence[np.ndarray], seed: int = 0):
        self.size = len(thumbs)
        flat = np.stack([t.reshape(-1) for t in thumbs]).astype(np.float32) if thumbs else np.zeros((0, 1), np.float32)
        centred = flat - flat.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(centred, axis=1)
        self._flat = norms < FLAT_NORM
        self._units = np.where(self._flat[:, None], 0.0, centred / np.maximum(norms, 1e-6)[:, None]).astype(np.float32)
        self.typical = self._typical_distance(seed)
        self.threshold = float(min(np.clip(CLOSER_THAN_TYPICAL * self.typical, PIXEL_FLOOR, PIXEL_CEILING),
                                   AT_MOST_OF_TYPICAL * self.typical)) if np.isfinite(self.typical) else PIXEL_FLOOR

    def describe(self) -> dict:
        """The rule as data.json records it."""
        return {"distance": "1 - correlation of 16-px grayscale thumbnails", "threshold": round(self.threshold, 5),
                "typical_second_nearest": round(self.typical, 5) if np.isfinite(self.typical) else None,
                "blank_images": int(self._flat.sum())}

    def pairs(self, groups: Sequence, probes: Sequence[int] | None = None) -> list[Pair]:
        """Near-duplicate pairs whose two images are in different groups (splits), closest first.

        probes: compare only these images with all others (the rare ones of a very large data set).
        """
        groups = np.asarray(groups)
        everyone = np.arange(self.size)
        rows = everyone if probes is None else np.asarray(sorted(probes), dtype=np.int64)
        is_probe = np.zeros(self.size, dtype=bool)
        is_probe[rows] = True
        found = []
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start:start + CHUNK]
            distance = self.distances(chunk)
            match = (distance <= self.threshold) & (groups[chunk, None] != groups[None, :])
            match &= ~is_probe[None, :] | (chunk[:, None] < everyone[None, :])  # a pair of two probes once
            found += [Pair(int(chunk[i]), int(j), float(distance[i, j])) for i, j in zip(*np.nonzero(match))]
        return sorted(found, key=lambda pair: (pair.distance, pair.a, pair.b))

    def copied(self, queries: Sequence[int], among: Sequence[int]) -> np.ndarray:
        """For each query image, whether a near-duplicate of it is among `among` (bool array)."""
        queries, among = np.asarray(queries, dtype=np.int64), np.asarray(among, dtype=np.int64)
        result = np.zeros(len(queries), dtype=bool)
        for start in range(0, len(queries) if len(among) else 0, CHUNK):
            chunk = queries[start:start + CHUNK]
            match = (self.distances(chunk, among) <= self.threshold) & (chunk[:, None] != among[None, :])
            result[start:start + CHUNK] = match.any(axis=1)
        return result

    def distances(self, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """1 - correlation of the thumbnails (rows x cols; every image when cols is None, without copying the
        whole matrix for each chunk); 1 where either is flat."""
        others, others_flat = (self._units, self._flat) if cols is None else (self._units[cols], self._flat[cols])
        distance = 1.0 - self._units[rows] @ others.T
        return np.where(self._flat[rows, None] | others_flat[None, :], 1.0, distance)

    def _typical_distance(self, seed: int) -> float:
        """Median over (up to CALIBRATION_PROBES seeded) images of the distance to their second-nearest image."""
        rows = np.flatnonzero(~self._flat)
        if len(rows) < 3:
            return float("nan")
        if len(rows) > CALIBRATION_PROBES:
            rows = np.sort(np.random.default_rng(seed).choice(rows, CALIBRATION_PROBES, replace=False))
        second = []
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start:start + CHUNK]
            distance = self.distances(chunk)
            distance[np.arange(len(chunk)), chunk] = np.inf
            second.append(np.partition(distance, 1, axis=1)[:, 1])
        return float(np.median(np.concatenate(second)))


def find_leaks(rows: list[SplitRow], thumbs: dict[str, np.ndarray], seed: int = 0) -> tuple[list[dict], dict]:
    """Pairs of images in different splits that are near-duplicates, closest first, and the rule's calibration."""
    rows = [row for row in rows if thumbs.get(row.id) is not None]
    index = NearDuplicates([thumbs[row.id] for row in rows], seed)
    probes = [i for i, row in enumerate(rows) if row.rare] if len(rows) > FULL_CHECK_LIMIT else None
    pairs = index.pairs([row.split for row in rows], probes)
    leaks = [{"a": rows[p.a].id, "a_split": rows[p.a].split, "b": rows[p.b].id, "b_split": rows[p.b].split,
              "distance": round(p.distance, 5)} for p in pairs[:MAX_LISTED]]
    return leaks, {**index.describe(), "pairs": len(pairs)}


def duplicated_test_share(train: Sequence[np.ndarray | None], test: Sequence[np.ndarray | None],
                          seed: int = 0) -> float:
    """Share of test images that nearly copy a training image: single copies are warned about as leaks; a test
    folder that mostly copies the training data is refused."""
    train = [t for t in train if t is not None]
    test = [t for t in test if t is not None]
    if not train or not test:
        return 0.0
    index = NearDuplicates(train + test, seed)
    return float(index.copied(np.arange(len(train), index.size), np.arange(len(train))).mean())

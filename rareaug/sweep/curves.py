"""Test metrics of a group of sweep cells (the seeds and folds of one method and ratio), from their saved
predictions: the mean over cells, each at its own validation threshold, with a 95% test-bootstrap interval."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from .metrics import seed_mean_intervals


def cell_predictions(sweep_dir: Path, cell: str, split: str = "test") -> list[dict]:
    """One cell's saved predictions on a split, sorted by image id so cells line up."""
    with open(Path(sweep_dir) / "predictions" / f"{cell}.csv", newline="", encoding="utf-8") as handle:
        return sorted((row for row in csv.DictReader(handle) if row["split"] == split), key=lambda row: row["id"])


def group_intervals(sweep_dir: Path, cells: Sequence[dict], metrics: Sequence[str], n_boot: int = 1000,
                    seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """metric -> (mean over `cells` (rows of metrics.csv), low, high); {} when none has test predictions."""
    runs, labels = [], None
    for cell in cells:
        test = cell_predictions(sweep_dir, cell["cell"])
        if test:
            labels = [int(row["label"]) for row in test]
            runs.append(([float(row["score"]) for row in test], float(cell["threshold"])))
    return seed_mean_intervals(labels, runs, metrics, n_boot=n_boot, seed=seed) if runs else {}

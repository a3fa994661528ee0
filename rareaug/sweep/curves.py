"""Test metrics of a group of sweep cells (the seeds and folds of one method and ratio), from their saved
predictions: the mean over cells, each at its own validation threshold, with a 95% test-bootstrap interval."""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import RareaugError
from ..io import read_csv
from ..run_dir import RunDir
from .metrics import seed_mean_intervals


def read_predictions(run: RunDir, cell: str) -> list[dict]:
    """One cell's saved predictions (every split, in file order)."""
    return read_csv(run.sweep_predictions(cell), missing_ok=False, fix="rerun `rareaug sweep-ratio` on this run")


def cell_predictions(run: RunDir, cell: str, split: str = "test") -> list[dict]:
    """One cell's saved predictions on a split, sorted by image id so cells line up."""
    try:
        return sorted((row for row in read_predictions(run, cell) if row["split"] == split), key=lambda row: row["id"])
    except KeyError as error:
        raise RareaugError(f"{run.sweep_predictions(cell)}: unreadable (no column {error}); rerun `rareaug "
                           "sweep-ratio` on this run") from error


def group_intervals(run: RunDir, cells: Sequence[dict], metrics: Sequence[str], group_of: dict[str, str],
                    n_boot: int = 1000, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """metric -> (mean over `cells` (rows of metrics.csv), low, high); {} when none has test predictions.

    `group_of` maps image id -> patient group: whole patients are resampled, as everywhere else in the sweep.
    """
    runs, ids = [], None
    for cell in cells:
        test = cell_predictions(run, cell["cell"])
        if not test:
            continue
        cell_ids = [row["id"] for row in test]
        if ids is not None and cell_ids != ids:
            raise RareaugError(f"{run.sweep}: cells {cells[0]['cell']} and {cell['cell']} were tested on different "
                               "images; rerun `rareaug sweep-ratio` on this run")
        ids, labels = cell_ids, [int(row["label"]) for row in test]
        runs.append(([float(row["score"]) for row in test], float(cell["threshold"])))
    if not runs:
        return {}
    groups = [group_of.get(i) or i for i in ids]
    return seed_mean_intervals(labels, runs, metrics, groups=groups, n_boot=n_boot, seed=seed)


def patient_groups(rows) -> dict[str, str]:
    """Image id -> its (salted) patient group from split.csv's rows; images without one are their own group."""
    return {row.id: row.group or row.id for row in rows}


def cells_at(metrics: Sequence[dict], model: str, method: str, ratio: float) -> list[dict]:
    """The metrics.csv rows behind one point of a method's curve: ratio 0 is the shared `none` baseline."""
    wanted = "none" if ratio == 0 else method
    return [row for row in metrics
            if row["model"] == model and float(row["ratio"]) == ratio and row["method"] == wanted]

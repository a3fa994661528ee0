"""The report's plots (matplotlib, drawn off-screen) and image grids, each returned as PNG bytes."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display: the report is written by servers and CI as often as by laptops
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ..run_dir import RunDir  # noqa: E402
from ..sweep.curves import cells_at, group_intervals  # noqa: E402
from .gather import ReportData  # noqa: E402

CURVE_METRICS = (("recall", "recall"), ("f1", "F1"), ("pr_auc", "PR-AUC"))
BASELINE = "none"


def curve_points(data: ReportData, model: str, method: str) -> list[dict]:
    """Per ratio: test recall, F1 and PR-AUC averaged over seeds and folds, with 95% test-bootstrap intervals."""
    ratios = {float(row["ratio"]) for row in data.metrics if row["model"] == model}
    by_ratio = {ratio: cells for ratio in ratios if (cells := cells_at(data.metrics, model, method, ratio))}
    points = []
    for ratio in sorted(by_ratio):
        found = group_intervals(RunDir(data.run), by_ratio[ratio], [name for name, _ in CURVE_METRICS],
                                data.groups, n_boot=500)
        if not found:
            continue
        diversity = [float(c["diversity"]) for c in by_ratio[ratio] if c.get("diversity") not in (None, "", "nan")]
        points.append({"ratio": ratio, "n_cells": len(by_ratio[ratio]),
                       **{name: found[name] for name, _ in CURVE_METRICS},
                       "diversity": float(np.mean(diversity)) if diversity else None,
                       "diversity_metric": by_ratio[ratio][0].get("diversity_metric") or ""})
    return points


def metric_curves(curves: dict[str, list[dict]], recommended: dict[str, float | None], title: str) -> bytes:
    """One panel per metric; a line and band per method; ratio 0 as a dashed line across; ★ = recommended."""
    ratios = sorted({p["ratio"] for points in curves.values() for p in points})
    position = {r: i for i, r in enumerate(ratios)}
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(4.2 * len(CURVE_METRICS), 3.4), constrained_layout=True)
    for ax, (name, label) in zip(axes, CURVE_METRICS):
        baseline = next((p[name] for points in curves.values() for p in points if p["ratio"] == 0), None)
        if baseline:
            ax.axhspan(baseline[1], baseline[2], color="0.85", zorder=0)
            ax.axhline(baseline[0], color="0.35", linestyle="--", linewidth=1, label="ratio 0 (real only)")
        for method, points in curves.items():
            xs = [position[p["ratio"]] for p in points]
            mean = [p[name][0] for p in points]
            line, = ax.plot(xs, mean, marker="o", label=method)
            ax.fill_between(xs, [p[name][1] for p in points], [p[name][2] for p in points], color=line.get_color(),
                            alpha=0.18)
            best = recommended.get(method)
            if best is not None and best in position:
                chosen = next(p for p in points if p["ratio"] == best)
                ax.plot([position[best]], [chosen[name][0]], marker="*", markersize=15, color=line.get_color(),
                        markeredgecolor="black", zorder=5)
        ax.set_xticks(range(len(ratios)), [f"{r:g}×" for r in ratios])
        ax.set_xlabel("synthetic : real rare images")
        ax.set_ylabel(f"test {label}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    return _png(fig)


def diversity_curves(curves: dict[str, list[dict]]) -> bytes | None:
    series = {m: [p for p in points if p["diversity"] is not None] for m, points in curves.items()}
    series = {m: points for m, points in series.items() if points}
    if not series:
        return None
    metric = next(p["diversity_metric"] for points in series.values() for p in points)
    fig, ax = plt.subplots(figsize=(5, 3.2), constrained_layout=True)
    for method, points in series.items():
        ax.plot([f"{p['ratio']:g}×" for p in points], [p["diversity"] for p in points], marker="o", label=method)
    ax.set_xlabel("synthetic : real rare images")
    ax.set_ylabel(f"diversity ({metric})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def guard_histogram(values: list[float], limit: float | None, rejected: int, title: str,
                    rule: str = "absolute") -> bytes:
    """Relative rule: each image's distance ratio (nearest real / mean of the next ones) against the ratio;
    absolute rule: the distance to the nearest real image against the threshold."""
    fig, ax = plt.subplots(figsize=(5, 3), constrained_layout=True)
    ax.hist(values, bins=30, color="#4c78a8")
    if limit is not None:
        ax.axvline(limit, color="#d62728", linestyle="--", label=f"{'ratio' if rule == 'relative' else 'threshold'} "
                                                                   f"{limit:.3f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("nearest real / mean of the next nearest reals" if rule == "relative"
                  else "distance to the nearest real training image")
    ax.set_ylabel("synthetic images")
    ax.set_title(f"{title}: {rejected} rejected", fontsize=10)
    return _png(fig)


def image_grid(images: list[Image.Image], columns: int, side: int = 96) -> bytes:
    """Images in a grid, each shown at `side` px (nearest-neighbour for small ones, so pixels stay honest)."""
    rows = max(1, -(-len(images) // columns))
    grid = Image.new("RGB", (columns * side, rows * side), "white")
    for i, image in enumerate(images):
        image = image.convert("RGB")
        resample = Image.NEAREST if max(image.size) < side else Image.BICUBIC
        grid.paste(image.resize((side, side), resample), ((i % columns) * side, (i // columns) * side))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()

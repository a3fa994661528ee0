"""Sweep cells per minute: one at a time (train_cell) against many at once (sweep/group.py), in the same run.

The cells are the evidence benchmark's: a ResNet18 from scratch at 32 px, batch 32, the same step count each,
each with its own seed and its own training set (real images plus a different number of synthetic ones).
Images are random 32-px pictures: speed does not depend on what they show.

    python bench/bench_sweep.py --device cuda --cells 32 --group 16,32 --steps 500 \
        --out bench/results/sweep-$(nvidia-smi --query-gpu=name --format=csv,noheader | tr ' ' -)-$(date +%F).json
    python bench/bench_sweep.py --device cpu --cells 4 --group 4 --steps 40     # 2 CPU cores

Prints one JSON line per figure as it is measured, then the summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rareaug.config import Config  # noqa: E402
from rareaug.sweep.classifiers import create_classifier  # noqa: E402
from rareaug.sweep.data import CellData, Example, ImageCache  # noqa: E402
from rareaug.sweep.group import train_group  # noqa: E402
from rareaug.sweep.train import train_cell  # noqa: E402


def make_cells(folder: Path, n_cells: int) -> list[CellData]:
    """Real 16 positives and 300 negatives shared, 0..n synthetic positives per cell, 40 validation, 100 test."""
    rng = np.random.default_rng(0)

    def examples(prefix: str, n: int, label: int, synthetic: bool = False) -> list[Example]:
        found = []
        for i in range(n):
            path = folder / f"{prefix}{i}.png"
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
            found.append(Example(f"{prefix}{i}", label, path, synthetic=synthetic, target=label))
        return found

    real = examples("p", 16, 1) + examples("n", 300, 0)
    val, test = examples("vp", 4, 1) + examples("vn", 36, 0), examples("tp", 10, 1) + examples("tn", 90, 0)
    synthetic = examples("s", 16 * n_cells, 1, synthetic=True)
    return [CellData(real + synthetic[:16 * (k % 5)], val, test) for k in range(n_cells)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def models(n: int, device: torch.device) -> list:
    built = []
    for k in range(n):
        torch.manual_seed(k)
        built.append(create_classifier("resnet18", pretrained=False).to(device))
    return built


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cells", type=int, default=16, help="cells trained by each way")
    parser.add_argument("--group", default="16", help="group sizes to time, comma-separated")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--alone-cells", type=int, default=None, help="cells timed one at a time (default --cells)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = Config()
    sweep = dataclasses.replace(config.sweep, steps=args.steps, batch_size=32)
    summary = {"command": "python bench/bench_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                          else f"cpu ({torch.get_num_threads()} threads)"),
               "model": "resnet18, random init, 32 px, batch 32", "steps": args.steps}
    with tempfile.TemporaryDirectory() as folder:
        cells = make_cells(Path(folder), args.cells)
        cache = ImageCache(config.recipe, 32)
        for cell in cells:  # decode every image once, outside the timings
            cache.batch(cell.train + cell.val + cell.test)
        n_alone = args.alone_cells or args.cells
        sync(device)
        started = time.perf_counter()
        for k, model in enumerate(models(n_alone, device)):
            train_cell(model, cells[k], cache, sweep, config.recipe.augment, 2.0, k, device)
        sync(device)
        seconds = time.perf_counter() - started
        summary["alone_cells_per_minute"] = 60 * n_alone / seconds
        print(json.dumps({"way": "alone", "cells": n_alone, "seconds": round(seconds, 2),
                          "cells_per_minute": round(summary["alone_cells_per_minute"], 2)}), flush=True)
        summary["grouped"] = {}
        for size in (int(s) for s in args.group.split(",")):
            sync(device)
            started = time.perf_counter()
            for start in range(0, args.cells, size):
                chunk = cells[start:start + size]
                train_group(models(len(chunk), device), chunk, cache, sweep, config.recipe.augment,
                            [2.0] * len(chunk), list(range(start, start + len(chunk))), device, [None] * len(chunk))
            sync(device)
            seconds = time.perf_counter() - started
            rate = 60 * args.cells / seconds
            summary["grouped"][str(size)] = {"cells_per_minute": rate, "seconds": seconds}
            print(json.dumps({"way": "grouped", "group": size, "cells": args.cells, "seconds": round(seconds, 2),
                              "cells_per_minute": round(rate, 2),
                              "speedup_vs_alone": round(rate / summary["alone_cells_per_minute"], 2)}), flush=True)
    print(json.dumps(summary), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()

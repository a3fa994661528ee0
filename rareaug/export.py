"""`rareaug export`: the augmented training set a user trains their production model on.

Real training images of every class plus the first ratio x (real rare training images) kept synthetic images
of one pool, as `class/<opaque id>.<suffix>` with a manifest of where each file came from. Ready for any
training tool that reads class folders. The run directory and the data folder are only read.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shutil
import tempfile
from pathlib import Path

from .errors import RareaugError
from .generate.manifest import kept_rows
from .split import read_split

MANIFEST_COLUMNS = ("file", "class", "source", "id", "variant", "loras", "weights", "seed", "nearest_real_id",
                    "nearest_real_distance")


@dataclasses.dataclass
class ExportResult:
    out: Path
    real: int
    synthetic: int
    variant: str
    ratio: float


def export_training_set(run: Path, out: Path, method: str = "loft", ratio: float | None = None,
                        recommended: bool = False, model: str | None = None, variant: str | None = None) -> ExportResult:
    run, out = Path(run), Path(out)
    rows = read_split(run / "split.csv") if (run / "split.csv").is_file() else None
    if rows is None:
        raise RareaugError(f"{run}: not a run directory (no split.csv); pass the --run of a fitted run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RareaugError(f"--out {out}: exists and is not empty; give a new folder (nothing is overwritten)")
    # 1. How many synthetic images: an explicit ratio or the sweep's recommendation.
    if recommended == (ratio is not None):
        raise RareaugError("give exactly one of --ratio R or --recommended")
    if recommended:
        ratio = _recommended_ratio(run, method, model)
    train = [row for row in rows if row.split == "train"]
    rare_train = [row for row in train if row.rare]
    needed = int(round(ratio * len(rare_train)))
    # 2. Which pool, and are there enough kept images in it.
    folder = _pool(run, method, variant) if needed else None
    kept = kept_rows(_manifest(folder)) if folder else []
    if len(kept) < needed:
        raise RareaugError(f"{folder}: {len(kept)} kept images, ratio {ratio:g} needs {needed}; run `rareaug generate "
                           f"--run {run} --method {method} --ratio {ratio:g}` first")
    # 3. Copy into a temporary sibling, then move into place: a failed export leaves no half folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        records = []
        for row in train:
            name = f"{row.id}{row.abs_path.suffix.lower()}"
            _copy(row.abs_path, staging / row.cls / name)
            records.append({"file": f"{row.cls}/{name}", "class": row.cls, "source": "real", "id": row.id})
        for item in kept[:needed]:
            name = f"{folder.name}-{item['file']}"
            _copy(folder / item["file"], staging / item["class"] / name)
            records.append({"file": f"{item['class']}/{name}", "class": item["class"], "source": "synthetic",
                            "id": item["file"].rsplit(".", 1)[0], "variant": folder.name,
                            **{key: item.get(key, "") for key in MANIFEST_COLUMNS[5:]}})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(records)
        (staging / "manifest.csv").write_text(buffer.getvalue())
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, len(train), needed, folder.name if folder else "", ratio)


def _recommended_ratio(run: Path, method: str, model: str | None) -> float:
    path = run / "sweep" / "summary.json"
    if not path.is_file():
        raise RareaugError(f"{path}: no sweep yet; run `rareaug sweep-ratio --run {run}` first, or pass --ratio R")
    models = json.loads(path.read_text()).get("models", {})
    if model is None:
        if len(models) != 1:
            raise RareaugError(f"{path}: the sweep has several models ({', '.join(models)}); pass --model NAME")
        model = next(iter(models))
    found = models.get(model, {}).get(method, {}).get("recommended_ratio")
    if found is None:
        raise RareaugError(f"{path}: no recommended ratio for {method} with {model}; sweep it with --methods {method}, "
                           "or pass --ratio R")
    return float(found)


def _pool(run: Path, method: str, variant: str | None) -> Path:
    pools = {}
    for summary in sorted((run / "synthetic").glob("*/summary.json")):
        content = json.loads(summary.read_text())
        if content.get("method") == method and not re.search(r"-f\d+$", summary.parent.name):  # not a fold's pool
            pools[summary.parent.name] = summary.parent
    if variant:
        if variant not in pools:
            raise RareaugError(f"{run}/synthetic/{variant}: no such {method} pool; choose one of {', '.join(pools) or 'none'}")
        return pools[variant]
    if not pools:
        raise RareaugError(f"{run}/synthetic: no {method} pool; run `rareaug generate --run {run} --method {method}` first")
    if len(pools) > 1:
        raise RareaugError(f"{run}/synthetic: several {method} pools ({', '.join(pools)}); pass --variant NAME")
    return next(iter(pools.values()))


def _manifest(folder: Path) -> list[dict]:
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _copy(source: Path, target: Path) -> None:
    if not source.is_file():
        raise RareaugError(f"{source}: missing since the split was made; restore it, or start a new run")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)

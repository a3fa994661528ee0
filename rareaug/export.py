"""`rareaug export`: the augmented training set a user trains their production model on.

Real training images of every class plus the first ratio x (real rare training images) kept synthetic images
of one pool, as `class/<opaque id>.png` with a manifest of where each file came from. Ready for any training
tool that reads class folders. Real images are decoded (DICOM windowing included) and written as new PNGs, so
no DICOM tag, EXIF field or file name travels with them. The run directory and the data folder are only read.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_adapters.decode import DecodeError, decode

from .errors import RareaugError
from .generate.manifest import Manifest, kept_rows
from .io import read_json, write_csv
from .run_dir import RunDir, mark_rareaug_folder, refuse_inside_data
from .split import SplitRow, fold_view, read_split, split_folds

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
                        recommended: bool = False, model: str | None = None, variant: str | None = None,
                        fold: int | None = None, frame: int = 0) -> ExportResult:
    """Args: fold: with a cross-validated run, the fold whose training images and pool to export."""
    run, out = Path(run), Path(out)
    rows = read_split(RunDir(run).split_csv) if RunDir(run).split_csv.is_file() else None
    if rows is None:
        raise RareaugError(f"{run}: not a run directory (no split.csv); pass the --run of a fitted run")
    refuse_inside_data(out, "--out", {row.root for row in rows})
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RareaugError(f"--out {out}: exists and is not empty; give a new folder (nothing is overwritten)")
    # 1. How many synthetic images: an explicit ratio or the sweep's recommendation.
    if recommended == (ratio is not None):
        raise RareaugError("give exactly one of --ratio R or --recommended")
    if recommended:
        ratio = _recommended_ratio(run, method, model)
    if not (math.isfinite(ratio) and ratio >= 0):
        raise RareaugError(f"--ratio {ratio}: give a finite ratio of 0 or more")
    folds = split_folds(rows)
    if folds > 1 and fold is None:
        raise RareaugError(f"{run}/split.csv has {folds} folds: pass --fold F to export fold F's training images "
                           "and the pool fused from them")
    if fold is not None and not 0 <= fold < folds:
        raise RareaugError(f"--fold {fold}: this run has folds 0 to {folds - 1}")
    # A fold trains on every non-test image outside it, as the sweep did.
    view = fold_view(rows, folds, fold or 0)
    train, rare_train = view.train, view.rare_train
    needed = int(round(ratio * len(rare_train)))
    # 2. Which pool, and are there enough kept images in it.
    folder = _pool(run, method, variant, fold if folds > 1 else None) if needed else None
    kept = kept_rows(Manifest(folder).rows()) if folder else []
    if len(kept) < needed:
        raise RareaugError(f"{folder}: {len(kept)} kept images, ratio {ratio:g} needs {needed}; run `rareaug generate "
                           f"--run {run} --method {method} --ratio {ratio:g}` first")
    # 3. Copy into a temporary sibling, then move into place: a failed export leaves no half folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes 0700; the training set is meant to be read by others
    try:
        records = []
        for row in train:
            name = f"{row.id}.png"
            _write_real(row, staging / row.cls / name, frame)
            records.append({"file": f"{row.cls}/{name}", "class": row.cls, "source": "real", "id": row.id})
        for item in kept[:needed]:
            name = f"{folder.name}-{item['file']}"
            _copy(folder / item["file"], staging / item["class"] / name)
            records.append({"file": f"{item['class']}/{name}", "class": item["class"], "source": "synthetic",
                            "id": item["file"].rsplit(".", 1)[0], "variant": folder.name,
                            **{key: item.get(key, "") for key in MANIFEST_COLUMNS[5:]}})
        write_csv(staging / "manifest.csv", MANIFEST_COLUMNS, records)
        mark_rareaug_folder(staging)  # real copies in it are never read back as new real data
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, len(train), needed, folder.name if folder else "", ratio)


def _recommended_ratio(run: Path, method: str, model: str | None) -> float:
    path = RunDir(run).sweep_summary_json
    if not path.is_file():
        raise RareaugError(f"{path}: no sweep yet; run `rareaug sweep-ratio --run {run}` first, or pass --ratio R")
    models = (read_json(path) or {}).get("models", {})
    if model is None:
        if len(models) != 1:
            raise RareaugError(f"{path}: the sweep has several models ({', '.join(models)}); pass --model NAME")
        model = next(iter(models))
    found = models.get(model, {}).get(method, {}).get("recommended_ratio")
    if found is None:
        raise RareaugError(f"{path}: no recommended ratio for {method} with {model}; sweep it with --methods {method}, "
                           "or pass --ratio R")
    return float(found)


def _pool(run: Path, method: str, variant: str | None, fold: int | None) -> Path:
    """The method's pool made from the exported training images: the whole-train pool, or fold F's."""
    pools = {}
    for summary in sorted(RunDir(run).synthetic.glob("*/summary.json")):
        found = re.search(r"-f(\d+)$", summary.parent.name)
        pool_fold = int(found.group(1)) if found else None
        if (read_json(summary) or {}).get("method") == method and pool_fold == fold:
            pools[summary.parent.name] = summary.parent
    if variant:
        if variant not in pools:
            raise RareaugError(f"{run}/synthetic/{variant}: no such {method} pool; "
                               f"choose one of {', '.join(pools) or 'none'}")
        return pools[variant]
    if not pools:
        fold_flag = f" --fold {fold}" if fold is not None else ""
        raise RareaugError(f"{run}/synthetic: no {method} pool{' for fold ' + str(fold) if fold is not None else ''}; "
                           f"run `rareaug generate --run {run} --method {method}{fold_flag}` first")
    if len(pools) > 1:
        raise RareaugError(f"{run}/synthetic: several {method} pools ({', '.join(pools)}); pass --variant NAME")
    return next(iter(pools.values()))


def _copy(source: Path, target: Path) -> None:
    if not source.is_file():
        raise RareaugError(f"{source}: missing; rerun the stage that made it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def _write_real(row: SplitRow, target: Path, frame: int) -> None:
    """Decoded pixels as a fresh PNG: 16-bit grey keeps a radiograph's depth; colour is 8-bit RGB."""
    try:
        pixels = decode(row.abs_path, frame=frame).pixels
    except DecodeError as error:
        raise RareaugError(f"{row.id}: its image no longer decodes ({str(error).split(': ', 1)[-1]}); restore the "
                           "data folder the run was made from, or start a new run") from error
    target.parent.mkdir(parents=True, exist_ok=True)
    if pixels.shape[0] == 1:
        image = Image.fromarray((pixels[0] * 65535).round().astype(np.uint16))
    else:
        image = Image.fromarray((pixels[:3].transpose(1, 2, 0) * 255).round().astype(np.uint8), "RGB")
    image.save(target, format="PNG")

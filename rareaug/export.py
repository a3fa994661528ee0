"""`rareaug export`: the augmented training set a user trains their production model on.

Real training images of every class plus the first ratio x (real rare training images) kept synthetic images
of one pool, as `class/<opaque id>.png` with a manifest of where each file came from. Ready for any training
tool that reads class folders. Real images are decoded (DICOM windowing included) and written as new PNGs, so
no DICOM tag, EXIF field or file name travels with them. The run directory and the data folder are only read.

With `masks`, the same images in the MVTec AD layout that anomalib and `data_adapters`' mvtec reader take:
`train/good/<id>.png` (the normal class(es)), `test/<defect>/<id>.png` (real and synthetic rare images) and
`ground_truth/<defect>/<id>_mask.png` (0 / 255, the image's size) for each rare image that has a mask.
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

from data_adapters.decode import DecodeError, decode, load_mask

from .errors import RareaugError, one_line
from .generate.manifest import Manifest, kept_rows
from .io import read_json, write_csv
from .run_dir import RunDir, mark_rareaug_folder, refuse_inside_data
from .split import SplitRow, fold_view, read_split, split_folds

# Copied from the pool's manifest row: the mix, the seed, the nearest real image, and img2img's source or a
# defect's normal image and donor.
PROVENANCE = ("loras", "weights", "seed", "nearest_real_id", "nearest_real_distance", "source_id", "donor_id",
              "strength", "source_distance")
MANIFEST_COLUMNS = ("file", "class", "source", "id", "variant", *PROVENANCE, "mask")
NORMAL = "good"  # MVTec AD's (and anomalib's) name for the normal images' folder


@dataclasses.dataclass
class ExportResult:
    out: Path
    real: int
    synthetic: int
    variant: str
    ratio: float
    records: list[dict] = dataclasses.field(default_factory=list, repr=False)  # manifest.csv's rows
    defect: str = ""  # with masks: the folder name of the rare class under test/ and ground_truth/

    def masks_summary(self) -> str:
        """One line: what went where in the MVTec layout, and how many rare images have no mask."""
        good = [r for r in self.records if r["file"].startswith("train/")]
        rare = [r for r in self.records if r["file"].startswith("test/")]
        missing = [r for r in rare if not r["mask"]]
        classes = ", ".join(sorted({r["class"] for r in good})) or "none"
        line = (f"MVTec layout: train/{NORMAL} {len(good)} ({classes}), test/{self.defect} {len(rare)}, "
                f"ground_truth/{self.defect} {len(rare) - len(missing)} masks")
        if missing:
            real = sum(r["source"] == "real" for r in missing)
            line += (f"; {len(missing)} rare images have no mask ({real} real without a mask file, "
                     f"{len(missing) - real} synthetic from a pool without masks; their manifest.csv mask is empty)")
        return line


def export_training_set(run: Path, out: Path, method: str = "loft", ratio: float | None = None,
                        recommended: bool = False, model: str | None = None, variant: str | None = None,
                        fold: int | None = None, frame: int = 0, masks: bool = False) -> ExportResult:
    """Args:
        fold: with a cross-validated run, the fold whose training images and pool to export.
        masks: write the MVTec AD layout (train/good, test/<defect>, ground_truth/<defect>) instead of class folders.
    """
    run, out = Path(run), Path(out)
    rows = read_split(RunDir(run).split_csv) if RunDir(run).split_csv.is_file() else None
    if rows is None:
        raise RareaugError(f"{run}: not a run directory (no split.csv); pass the --run of a fitted run")
    refuse_inside_data(out, "--out", {row.root for row in rows})
    defect = defect_folder(rows) if masks else ""
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
        rare_cls = next((row.cls for row in rows if row.rare), None)
        records = []
        for row in train:
            file, mask = _place(row.cls, row.rare, f"{row.id}.png", defect)
            mask = mask if row.abs_mask else ""  # a real image without a mask file goes without one
            size = _write_real(row, staging / file, frame)
            if mask:
                _write_mask(row.abs_mask, staging / mask, size, "restore the data folder the run was made from")
            records.append({"file": file, "class": row.cls, "source": "real", "id": row.id, "mask": mask})
        for item in kept[:needed]:
            file, mask = _place(item["class"], item["class"] == rare_cls, f"{folder.name}-{item['file']}", defect)
            mask = mask if item.get("mask") else ""  # only the defect methods' pools have masks
            _copy(folder / item["file"], staging / file)
            if mask:
                _write_mask(folder / item["mask"], staging / mask, _size(folder / item["file"]),
                            "rerun the stage that made it")
            records.append({"file": file, "class": item["class"], "source": "synthetic",
                            "id": item["file"].rsplit(".", 1)[0], "variant": folder.name, "mask": mask,
                            **{key: item.get(key, "") for key in PROVENANCE}})
        write_csv(staging / "manifest.csv", MANIFEST_COLUMNS, records)
        mark_rareaug_folder(staging)  # real copies in it are never read back as new real data
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, len(train), needed, folder.name if folder else "", ratio, records, defect)


def defect_folder(rows: list[SplitRow]) -> str:
    """The rare class's folder name under test/ and ground_truth/: letters, digits, `_`, `-` and `.` only."""
    classes = sorted({row.cls for row in rows if row.rare})
    if not classes:
        raise RareaugError("--masks: this run's split has no rare class; make the run with --rare CLASS")
    name = re.sub(r"[^\w.-]+", "_", classes[0]).strip("._-")
    if not name:
        raise RareaugError(f"--masks: the rare class {classes[0]!r} has no letter or digit to name its folder "
                           "test/<defect>; rename the class (folder) and make a new run, or export without --masks")
    if name == NORMAL:
        raise RareaugError(f"--masks: the rare class is named {NORMAL!r}, the MVTec layout's name for normal images; "
                           "rename the class (folder) and make a new run, or export without --masks")
    return name


def _place(cls: str, rare: bool, name: str, defect: str) -> tuple[str, str]:
    """Where an image goes, and where its mask would go ('' where the layout keeps none)."""
    if not defect:
        return f"{cls}/{name}", ""
    if not rare:
        return f"train/{NORMAL}/{name}", ""
    return f"test/{defect}/{name}", f"ground_truth/{defect}/{name.rsplit('.', 1)[0]}_mask.png"


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


def _size(path: Path) -> tuple[int, int]:
    """A pool image's (height, width)."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, SyntaxError, ValueError) as error:
        raise RareaugError(f"{path}: not a readable image ({one_line(error)}); rerun the stage that made it") from error


def _write_mask(source: Path, target: Path, size: tuple[int, int], fix: str) -> None:
    """A mask re-written as an 8-bit PNG of 0 and 255 (any nonzero pixel is defect), checked against its image's
    (height, width) as written: a mask that does not cover its image pixel for pixel is refused, not resized."""
    if not source.is_file():
        raise RareaugError(f"{source}: mask missing; {fix}, or export without --masks")
    try:
        mask = load_mask(source)
    except DecodeError as error:
        raise RareaugError(f"{error}; {fix}, or export without --masks") from error
    if mask.shape != size:
        raise RareaugError(f"{source}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {size[1]}x{size[0]} "
                           "(width x height); give it a mask of the image's size, or export without --masks")
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(target, format="PNG")


def _write_real(row: SplitRow, target: Path, frame: int) -> tuple[int, int]:
    """Decoded pixels as a fresh PNG: 16-bit grey keeps a radiograph's depth; colour is 8-bit RGB. Its (height,
    width)."""
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
    return pixels.shape[1], pixels.shape[2]

"""The synthetic pool on disk: marked PNGs and a provenance manifest (ids only, never paths or patients).

Each worker appends to its own shard (`manifest.part-<worker>.csv`); `merge` folds the shards into
`manifest.csv`, one row per pool slot, in pool order. A rerun reads all of them and continues.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from data_adapters.decode import SYNTHETIC_MARKER

from .. import __version__
from ..io import atomic_write_bytes, read_csv, write_csv

COLUMNS = ("file", "pool_index", "class", "method", "loras", "weights", "seed", "attempt", "guidance", "steps",
           "scheduler", "prompt", "base_model", "base_model_hash", "rareaug_version", "nearest_real_id",
           "nearest_real_distance", "guard_score", "kept", "reject_reason",
           # img2img: the real image each one starts from, how far it was noised, and how far it stayed from it;
           # cutpaste / perlin: the normal image the defect went onto, the rare image the defect came from,
           # and the defect mask's file (masks/...)
           "source_id", "donor_id", "strength", "source_distance", "mask")
MASKS = "masks"  # a pool's defect masks: masks/s<slot>.png, 0 or 255, the size of the image


def image_file(pool_index: int) -> str:
    return f"s{pool_index:06d}.png"


def mask_file(pool_index: int) -> str:
    """The defect mask of a cutpaste / perlin image, relative to the pool folder."""
    return f"{MASKS}/s{pool_index:06d}.png"


def save_mask(path: Path, mask: torch.Tensor) -> None:
    """mask: (H, W) or (1, H, W), nonzero = defect -> an 8-bit PNG of 0 and 255 (MVTec AD's convention)."""
    array = (mask.reshape(mask.shape[-2:]) > 0.5).to(torch.uint8).mul(255).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array, "L").save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_png(path: Path, image: torch.Tensor, grayscale: bool, variant: str, pool_index: int) -> None:
    """8-bit PNG marked as synthetic in its text metadata; grayscale sources give grayscale images."""
    array = image.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = (Image.fromarray(array.mean(axis=2).round().astype(np.uint8), "L") if grayscale
               else Image.fromarray(array, "RGB"))
    info = PngInfo()
    info.add_text(SYNTHETIC_MARKER, "true")  # inspect refuses such files as real data
    info.add_text("rareaug:version", __version__)
    info.add_text("rareaug:variant", variant)
    info.add_text("rareaug:pool_index", str(pool_index))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buffer.getvalue())


class Manifest:
    def __init__(self, folder: Path, worker: int = 0):
        self.folder = folder
        self.path = folder / "manifest.csv"
        self.shard = folder / f"manifest.part-{worker}.csv"

    def rows(self) -> list[dict]:
        """Every slot recorded so far (merged file and every shard), one row per slot, in pool order."""
        by_slot: dict[int, dict] = {}
        for path in [self.path, *sorted(self.folder.glob("manifest.part-*.csv"))]:
            for row in _read(path):
                by_slot.setdefault(int(row["pool_index"]), row)
        return [by_slot[slot] for slot in sorted(by_slot)]

    def add(self, rows: list[dict]) -> None:
        existing = _read(self.shard)
        _write(self.shard, existing + rows)

    def merge(self) -> list[dict]:
        rows = self.rows()
        _write(self.path, rows)
        for shard in self.folder.glob("manifest.part-*.csv"):
            shard.unlink()
        return rows


def is_kept(row: dict) -> bool:
    return row["kept"] in ("1", 1, True, "True", "true")


def kept_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if is_kept(row)]


def _read(path: Path) -> list[dict]:
    return read_csv(path, fix="delete the pool's folder and rerun `rareaug generate`")


def _write(path: Path, rows: list[dict]) -> None:
    write_csv(path, COLUMNS, rows)

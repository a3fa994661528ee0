"""What one sweep cell trains and evaluates on: real images from the frozen split plus a prefix of a
synthetic pool, decoded once per sweep and kept as uint8 (a few hundred KB an image at 224 px)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import RecipeConfig
from ..images import model_input
from ..split import SplitRow, fold_view, seen_rows


@dataclasses.dataclass
class Example:
    id: str
    label: int  # 1 = rare
    path: Path
    mask: Path | None = None
    group: str = ""  # patient hash, for grouped bootstrap intervals
    synthetic: bool = False
    target: int = 0  # class index for the multi-class task (the rare class's index for synthetic images)
    digest: str = ""  # synthetic images: a hash of the file, so a changed pool never reuses old results


@dataclasses.dataclass
class CellData:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    # Synthetic images a ratio-0 model scores but never trains on: the user's own estimate of how many of a
    # pool's images a classifier of their real data calls the rare class.
    scored: list[Example] = dataclasses.field(default_factory=list)

    @property
    def n_real_rare(self) -> int:
        return sum(e.label for e in self.train if not e.synthetic)

    @property
    def n_synth(self) -> int:
        return sum(e.synthetic for e in self.train)


def class_names(rows: list[SplitRow]) -> list[str]:
    """The multi-class task's classes: the rare class first, then the others in name order — from train
    and validation rows only: a class seen only in test must not shape the model."""
    seen = seen_rows(rows)
    rare = [r.cls for r in seen if r.rare][:1]
    return rare + sorted({r.cls for r in seen} - set(rare))


def real_example(row: SplitRow, classes: list[str] | None = None) -> Example:
    # A test-only class gets no index (-1): it is a negative for every metric, never a training target.
    target = (classes.index(row.cls) if row.cls in classes else -1) if classes else int(row.rare)
    return Example(row.id, int(row.rare), row.abs_path, row.abs_mask, row.group, False, target)


def cell_data(rows: list[SplitRow], folds: int, fold: int, synthetic: list[Example],
              scored: list[Example] = ()) -> CellData:
    """Fold `fold`'s real train / validate / test images (`split.fold_view`) and the cell's synthetic ones."""
    classes = class_names(rows)
    view = fold_view(rows, folds, fold)
    train, val, test = ([real_example(r, classes) for r in part] for part in (view.train, view.validate, view.test))
    return CellData(train + synthetic, val, test, list(scored))


class ImageCache:
    """Decoded, cropped and resized images, 3 channels, uint8; grayscale repeated to three."""

    def __init__(self, recipe: RecipeConfig, size: int, frame: int = 0):
        self.recipe, self.size, self.frame = recipe, size, frame
        self._images: dict[Path, torch.Tensor] = {}

    def get(self, example: Example) -> torch.Tensor:
        if example.path not in self._images:
            pixels = model_input(example.path, self.size, self.recipe.crop, self.recipe.fallback_crop, example.mask,
                                 self.frame)
            self._images[example.path] = ((pixels / 2 + 0.5) * 255).round().to(torch.uint8)
        return self._images[example.path]

    def batch(self, examples: list[Example]) -> torch.Tensor:
        """(n, 3, size, size) float in [0, 1]."""
        return torch.stack([self.get(e) for e in examples]).float() / 255.0

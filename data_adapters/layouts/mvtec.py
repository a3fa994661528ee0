"""MVTec AD category: `train/good`, `test/<defect>`, `ground_truth/<defect>/<stem>_mask.png`; `good` is normal."""
from __future__ import annotations

from pathlib import Path

from ..records import DataError, Record, Scan
from .common import image_files, subfolders

NORMAL = "good"


def _is_category(folder: Path) -> bool:
    return (folder / "train" / NORMAL).is_dir() and (folder / "test").is_dir()


def detect(root: Path) -> bool:
    return root.is_dir() and (_is_category(root) or any(_is_category(sub) for sub in subfolders(root)))


def _category(root: Path) -> Path:
    if _is_category(root):
        return root
    categories = [sub for sub in subfolders(root) if _is_category(sub)] if root.is_dir() else []
    if len(categories) == 1:
        return categories[0]
    if not categories:
        raise DataError(f"{root}: not an MVTec AD category (no train/good and test/ folders); check --data or --layout")
    names = ", ".join(sub.name for sub in categories)
    raise DataError(f"{root}: holds several MVTec categories ({names}); point --data at one, e.g. {categories[0]}")


def scan(root: Path) -> Scan:
    category = _category(root.resolve())
    records = [
        Record(path=path, root=category, label=NORMAL, fixed_split="trainval")
        for path in image_files(category / "train" / NORMAL)
    ]
    for folder in subfolders(category / "test"):
        truth = category / "ground_truth" / folder.name
        for path in image_files(folder):
            mask = truth / f"{path.stem}_mask.png"
            records.append(
                Record(
                    path=path,
                    root=category,
                    label=folder.name,
                    mask_path=mask if mask.is_file() else None,
                    # The dataset's own test/good stays test; defects are split by rareaug's rules.
                    fixed_split="test" if folder.name == NORMAL else None,
                )
            )
    return Scan(layout="mvtec", root=category, records=records, problems=[], normal_classes=(NORMAL,))

"""Magnetic Tile Defect: `MT_<Class>/Imgs/*.jpg` with same-stem `*.png` masks; `MT_Free` is normal."""
from __future__ import annotations

from pathlib import Path

from ..records import Record, Scan
from .common import image_files, subfolders

PREFIX = "MT_"


def detect(root: Path) -> bool:
    return root.is_dir() and any(folder.name.startswith(PREFIX) for folder in subfolders(root))


def scan(root: Path) -> Scan:
    root = root.resolve()
    records = []
    for folder in subfolders(root):
        if not folder.name.startswith(PREFIX):
            continue
        label = folder.name[len(PREFIX):]
        files = image_files(folder)
        by_stem = {}
        for path in files:
            by_stem.setdefault(path.with_suffix(""), []).append(path)
        for stem, paths in sorted(by_stem.items()):
            # A PNG next to a same-stem JPEG is the JPEG's mask, never an image of its own.
            masks = [path for path in paths if path.suffix.lower() == ".png"]
            images = [path for path in paths if path.suffix.lower() != ".png"] or masks
            mask = masks[0] if masks and images is not masks else None
            records.extend(Record(path=image, root=root, label=label, mask_path=mask) for image in images)
    return Scan(layout="mt", root=root, records=records, problems=[], normal_classes=("Free",))

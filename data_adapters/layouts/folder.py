"""`root/<class>/...`: every image below a class folder (sub-folders included) belongs to that class."""
from __future__ import annotations

from pathlib import Path

from ..decode import is_image_file
from ..records import Problem, Record, Scan
from .common import image_files, subfolders, visible_files


def detect(root: Path) -> bool:
    return root.is_dir() and any(image_files(folder) for folder in subfolders(root))


def scan(root: Path) -> Scan:
    root = root.resolve()
    records = [
        Record(path=path, root=root, label=folder.name)
        for folder in subfolders(root)
        for path in image_files(folder)
    ]
    problems = [
        Problem(path.relative_to(root).as_posix(), "image outside any class folder; move it into root/<class>/",
                "outside class folders")
        for path in sorted(root.iterdir())
        if path.is_file() and not path.name.startswith(".") and is_image_file(path)
    ]
    if not records and not visible_files(root):
        problems.append(Problem(".", "the folder is empty", "empty folder"))
    return Scan(layout="folder", root=root, records=records, problems=problems)

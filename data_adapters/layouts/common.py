"""File walking shared by the layouts."""
from __future__ import annotations

import os
from pathlib import Path

from ..decode import is_image_file


def visible_files(folder: Path) -> list[Path]:
    """Every non-hidden file below `folder`, sorted, so ids never depend on the filesystem's order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        found.extend(Path(dirpath) / name for name in filenames if not name.startswith(".") and name != "Thumbs.db")
    return sorted(found)


def image_files(folder: Path) -> list[Path]:
    return [path for path in visible_files(folder) if is_image_file(path)]


def subfolders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))

"""File walking shared by the layouts."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..decode import is_image_file
from ..records import DataError


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


def read_table(path: Path) -> csv.DictReader:
    """A CSV as dict rows; a file that is not UTF-8 is a one-line error, not a traceback."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8 (e.g. 'CSV UTF-8') and run again") from None
    return csv.DictReader(io.StringIO(text, newline=""))

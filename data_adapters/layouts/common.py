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
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_unreadable):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        found.extend(Path(dirpath) / name for name in filenames if not name.startswith(".") and name != "Thumbs.db")
    return sorted(found)


RAREAUG_MARKER = ".rareaug"  # written into every run directory and export folder rareaug creates


def is_rareaug_folder(folder: Path) -> bool:
    """A run directory or export folder rareaug made (runs from before the marker: split.csv beside stages/)."""
    return (folder / RAREAUG_MARKER).exists() or ((folder / "split.csv").is_file() and (folder / "stages").is_dir())


def rareaug_folders(root: Path) -> list[Path]:
    """The outermost rareaug folders below `root` (root itself excluded)."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and is_rareaug_folder(here):
            found.append(here)
            dirnames[:] = []
    return sorted(found)


def _unreadable(error: OSError) -> None:
    """os.walk skips a folder it cannot list without a word; a class folder missing silently skews the data."""
    raise DataError(f"{error.filename}: cannot be listed ({error.strerror}); fix its permissions (e.g. chmod a+rx) "
                    "or move it out of the data folder")


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

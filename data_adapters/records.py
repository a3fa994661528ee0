"""What every layout returns: records (one per usable image) and problems (one per file it could not use)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


class DataError(Exception):
    """The data cannot be used as given; the message is one line naming the file and the fix."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """A library's error message as one line of at most `limit` characters, for a message of ours that names
    the file and the fix around it (the one formatter every module uses)."""
    text = " ".join(str(error).split())
    return text[:limit] or type(error).__name__


@dataclasses.dataclass
class Record:
    """One image as a layout found it. Paths stay in memory; only split.csv ever stores them."""

    path: Path  # absolute path of the image
    root: Path  # the data root the image was found under
    label: str  # the class as the layout names it ("Crack", "good", "No Finding", "Effusion|Infiltration")
    findings: tuple[str, ...] = ()  # every label the image carries (several in NIH); defaults to (label,)
    mask_path: Path | None = None
    patient: str | None = None  # raw patient key; hashed before it is written anywhere
    fixed_split: str | None = None  # "test" or "trainval" when the layout's own split says so
    # Set when a rare class is chosen: the class rareaug uses (the rare name, or the negative's class).
    cls: str = ""
    is_rare: bool = False
    # Filled in by probing (decoding) the file:
    width: int = 0
    height: int = 0
    mode: str = ""
    bit_depth: int = 0
    thumb: np.ndarray | None = None  # 16 x 16 grayscale, for near-duplicate checks across splits

    def __post_init__(self) -> None:
        if not self.findings:
            self.findings = (self.label,)

    @property
    def rel_path(self) -> str:
        return self.path.relative_to(self.root).as_posix()

    @property
    def rel_mask_path(self) -> str:
        return self.mask_path.relative_to(self.root).as_posix() if self.mask_path else ""


@dataclasses.dataclass
class Problem:
    """A file that was skipped. `path` is relative to the data root and is shown on screen only."""

    path: str
    reason: str  # may name files; shown on screen only
    kind: str = "unreadable"  # short and path-free: what files in the run directory keep


@dataclasses.dataclass
class Scan:
    """Everything a layout found under a root, before any class is chosen as rare."""

    layout: str
    root: Path
    records: list[Record]
    problems: list[Problem]
    normal_classes: tuple[str, ...] = ()  # the "normal" class(es); empty = every non-rare class is a negative
    patients_known: bool = False  # True when the layout carries patient ids (NIH, DICOM, csv column)

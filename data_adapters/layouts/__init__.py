"""One module per on-disk layout, and a registry that picks one by looking at the folder."""
from __future__ import annotations

from pathlib import Path

from ..records import DataError, Scan
from . import csv_list, folder, mt, mvtec, nih

# Detection order matters: the specific layouts first, the plain class-folder layout last.
LAYOUTS = {
    "csv": csv_list,
    "nih-cxr14": nih,
    "mt": mt,
    "mvtec": mvtec,
    "folder": folder,
}


def list_layouts() -> list[str]:
    return list(LAYOUTS)


def detect_layout(root: Path) -> str:
    for name, module in LAYOUTS.items():
        if module.detect(root):
            return name
    raise DataError(
        f"{root}: no images found in a known layout; expected class folders (root/<class>/*.png|jpg|dcm), "
        f"or pass --layout ({', '.join(LAYOUTS)})"
    )


def scan(root: Path, layout: str | None = None) -> Scan:
    """Find every candidate image under `root` (nothing decoded yet)."""
    if not root.exists():
        raise DataError(f"{root}: does not exist; give the folder (or CSV file) that holds your images")
    if layout is None:
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise DataError(f"--layout {layout!r} is unknown; choose one of: {', '.join(LAYOUTS)}")
    return LAYOUTS[layout].scan(root)

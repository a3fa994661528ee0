"""NIH ChestX-ray14: `Data_Entry_2017_v2020.csv` (or `Data_Entry_2017.csv`) with `Finding Labels` and
`Patient ID`; images under `images*/` or the root; `train_val_list.txt` / `test_list.txt` respected."""
from __future__ import annotations

from pathlib import Path

from ..records import DataError, Problem, Record, Scan
from .common import read_table, visible_files

ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
NORMAL = "No Finding"


def _entry_file(root: Path) -> Path | None:
    return next((root / name for name in ENTRY_FILES if (root / name).is_file()), None)


def detect(root: Path) -> bool:
    return root.is_dir() and _entry_file(root) is not None


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()} if path.is_file() else set()


def scan(root: Path) -> Scan:
    root = root.resolve()
    entry = _entry_file(root)
    if entry is None:
        raise DataError(f"{root}: no {' or '.join(ENTRY_FILES)}; the NIH layout needs the data entry CSV")
    # Images live in images_001/images/..., images/, or the root itself.
    folders = [path for path in root.iterdir() if path.is_dir() and path.name.startswith("images")]
    candidates = [file for folder in folders for file in visible_files(folder)]
    candidates += [path for path in root.iterdir() if path.is_file()]
    by_name = {path.name: path for path in candidates if path.suffix.lower() == ".png"}
    test_names, trainval_names = _read_list(root / "test_list.txt"), _read_list(root / "train_val_list.txt")

    records, problems = [], []
    reader = read_table(entry)
    missing = {"Image Index", "Finding Labels", "Patient ID"} - set(reader.fieldnames or [])
    if missing:
        raise DataError(f"{entry}: missing column(s) {', '.join(sorted(missing))}; is this the NIH data entry CSV?")
    for row_number, row in enumerate(reader, start=2):
        name, labels = row["Image Index"].strip(), row["Finding Labels"].strip()
        if name not in by_name:
            problems.append(Problem(f"{entry.name}:{row_number}", f"image {name} listed but not found under images*/",
                                    "listed file missing"))
            continue
        findings = tuple(label.strip() for label in labels.split("|") if label.strip()) or (NORMAL,)
        fixed = "test" if name in test_names else ("trainval" if name in trainval_names else None)
        records.append(
            Record(
                path=by_name[name],
                root=root,
                label="|".join(findings),
                findings=findings,
                patient=row["Patient ID"].strip() or None,
                fixed_split=fixed,
            )
        )
    return Scan(layout="nih-cxr14", root=root, records=records, problems=problems, normal_classes=(NORMAL,),
                patients_known=True)

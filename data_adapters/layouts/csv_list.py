"""Any CSV with `path,label[,patient_id]` columns (e.g. DICOM folders labelled elsewhere).

`--data` is the CSV file; paths resolve inside the CSV's folder, which is the data root.
"""
from __future__ import annotations

from pathlib import Path

from ..decode import is_image_file
from ..records import DataError, Problem, Record, Scan
from .common import read_table


def detect(root: Path) -> bool:
    return root.is_file() and root.suffix.lower() == ".csv"


def scan(table: Path) -> Scan:
    table = table.resolve()
    if not detect(table):
        raise DataError(f"{table}: the csv layout takes a .csv file as --data (columns path,label[,patient_id])")
    root = table.parent
    records, problems = [], []
    reader = read_table(table)
    columns = {name.strip().lower(): name for name in reader.fieldnames or []}
    if not {"path", "label"} <= set(columns):
        raise DataError(f"{table}: needs a header with columns path,label[,patient_id]; found {reader.fieldnames}")
    for row_number, row in enumerate(reader, start=2):
        where = f"{table.name}:{row_number}"
        raw_path = (row.get(columns["path"]) or "").strip()
        label = (row.get(columns["label"]) or "").strip()
        if not raw_path or not label:
            problems.append(Problem(where, f"row {row_number}: empty path or label", "bad CSV row"))
            continue
        path = (root / raw_path).resolve()
        if not path.is_relative_to(root):
            problems.append(Problem(where, f"row {row_number}: path escapes the data root (the CSV's "
                                           "folder); list only files inside it", "path outside the data root"))
            continue
        if not path.is_file():
            problems.append(Problem(where, f"row {row_number}: file not found", "listed file missing"))
            continue
        if not is_image_file(path):
            problems.append(Problem(where, f"row {row_number}: not an image or DICOM file", "not an image"))
            continue
        patient = (row.get(columns.get("patient_id", ""), "") or "").strip() or None
        records.append(Record(path=path, root=root, label=label, patient=patient))
    return Scan(layout="csv", root=root, records=records, problems=problems,
                patients_known="patient_id" in columns)

"""From a scanned layout to the images a run uses: choose the rare class and its negatives, then decode
(probe) every image once, so corrupt files are found before anything is split or trained."""
from __future__ import annotations

import dataclasses
import difflib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .decode import DecodeError, decode
from .layouts import scan as scan_layout
from .layouts.common import rareaug_folders
from .records import DataError, Problem, Record, Scan, one_line
from .thumbnail import thumbnail

NEGATIVE_RULES = ("normal", "all-other")
OTHER_FINDINGS = "other findings"


@dataclasses.dataclass
class Dataset:
    """The usable images of one data root, with the rare class chosen (or not, for a plain inspect)."""

    layout: str
    root: Path
    records: list[Record]  # decoded fine; rare + negatives when a rare class was chosen, else all
    problems: list[Problem]
    classes: dict[str, int]  # every class the layout has -> usable images (multi-label counted per label)
    rare: str | None
    patients_known: bool


def load_dataset(
    root: Path,
    layout: str | None = None,
    rare: str | None = None,
    negatives: str = "normal",
    max_per_class: int | None = None,
    seed: int = 0,
    on_bad_file: str = "skip",
    frame: int = 0,
) -> Dataset:
    """Scan, choose the rare class and negatives, subsample, and decode every chosen image once."""
    if negatives not in NEGATIVE_RULES:
        raise DataError(f"--negatives {negatives!r} is unknown; choose one of: {', '.join(NEGATIVE_RULES)}")
    if on_bad_file not in ("skip", "fail"):
        raise DataError(f"--on-bad-file {on_bad_file!r} is unknown; choose skip or fail")
    found = scan_layout(Path(root).expanduser(), layout)
    found = without_unnameable_files(without_rareaug_folders(found))
    if not found.records:
        raise DataError(f"{found.root}: no images found for layout {found.layout!r}; check --data and --layout")
    if on_bad_file == "fail" and found.problems:
        first = found.problems[0]
        raise DataError(f"{found.root / first.path}: {first.reason} (stopping: --on-bad-file fail)")
    rare_name = match_class(found, rare) if rare else None
    chosen = {id(record) for record in choose(found, rare_name, negatives)}
    # Every class is decoded (its count in `classes` is of usable images), each negative class capped.
    rng = np.random.default_rng(seed)
    problems = list(found.problems)
    usable = []
    for label, members in _group_by_label(found.records, rare_name).items():
        limit = max_per_class if (max_per_class and label != rare_name) else None
        usable += probe_until(members, limit, rng, problems, on_bad_file, frame)
    usable.sort(key=lambda record: record.rel_path)
    if rare_name is not None and not any(record.is_rare for record in usable):
        raise DataError(f"{found.root}: every image of the rare class {rare_name!r} failed to decode; see problems")
    classes = Counter(finding for record in usable for finding in record.findings)
    records = [record for record in usable if id(record) in chosen]
    patients_known = found.patients_known or any(record.patient for record in records)
    return Dataset(found.layout, found.root, records, problems, dict(sorted(classes.items())), rare_name,
                   patients_known)


def without_rareaug_folders(found: Scan) -> Scan:
    """Drop files inside a rareaug run or export folder that sits in the data folder, with one problem line each:
    its exported copies and synthetic images must never be counted as real data (nor leak into a test split)."""
    folders = rareaug_folders(found.root) if found.root.is_dir() else []
    if not folders:
        return found
    prefixes = [folder.relative_to(found.root).as_posix() + "/" for folder in folders]
    inside = Counter(next((p for p in prefixes if record.rel_path.startswith(p)), None) for record in found.records)
    kept = [record for record in found.records if not any(record.rel_path.startswith(p) for p in prefixes)]
    problems = list(found.problems) + [
        Problem(prefix.rstrip("/"), f"a rareaug run or export folder ({inside[prefix]} image(s) left out); keep "
                "runs and exports outside the data folder", "rareaug folder") for prefix in prefixes]
    return dataclasses.replace(found, records=kept, problems=problems)


def without_unnameable_files(found: Scan) -> Scan:
    """A file name that is not valid UTF-8 (bytes from another system's encoding) cannot be written to split.csv
    or shown faithfully: it is skipped as a problem, with the fix."""
    kept, bad = [], []
    for record in found.records:
        try:
            record.rel_path.encode("utf-8")
            kept.append(record)
        except UnicodeEncodeError:
            bad.append(record)
    if not bad:
        return found
    problems = list(found.problems) + [
        Problem(record.rel_path.encode("utf-8", "backslashreplace").decode("utf-8"),
                "file name is not valid UTF-8; rename it (e.g. convmv -f latin1 -t utf8)", "file name not UTF-8")
        for record in bad]
    return dataclasses.replace(found, records=kept, problems=problems)


def match_class(found: Scan, rare: str) -> str:
    """Case-insensitive match of --rare against the layout's class names (NIH: single findings)."""
    names = sorted({finding for record in found.records for finding in record.findings})
    by_lower = {name.lower(): name for name in names}
    if rare.lower() in by_lower:
        return by_lower[rare.lower()]
    close = difflib.get_close_matches(rare.lower(), list(by_lower), n=1, cutoff=0.5)
    hint = f"; closest match: {by_lower[close[0]]!r}" if close else ""
    raise DataError(f"rare class {rare!r} not found in {found.root}; classes are: {', '.join(names)}{hint}")


def choose(found: Scan, rare: str | None, negatives: str) -> list[Record]:
    """Tag each record rare or negative; drop the images that are neither under the negatives rule."""
    if rare is None:
        for record in found.records:
            record.cls, record.is_rare = record.label, False
        return list(found.records)
    chosen = []
    normal = set(found.normal_classes)
    for record in found.records:
        if rare in record.findings:
            record.cls, record.is_rare = rare, True
        elif negatives == "all-other" or not normal or record.label in normal:
            multi = found.layout == "nih-cxr14" and record.label not in normal
            record.cls, record.is_rare = (OTHER_FINDINGS if multi else record.label), False
        else:
            continue
        chosen.append(record)
    return chosen


def _group_by_label(records: list[Record], rare: str | None) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(rare if rare in record.findings else record.label, []).append(record)
    return groups


def probe_until(records, limit, rng, problems, on_bad_file, frame: int = 0) -> list[Record]:
    """Decode records (in a seeded random order when subsampling) until `limit` usable ones are found."""
    if limit is not None and limit < len(records):
        records = [records[i] for i in rng.permutation(len(records))]
    wanted = len(records) if limit is None else min(limit, len(records))
    usable, start = [], 0
    while len(usable) < wanted and start < len(records):
        batch = records[start:start + wanted - len(usable)]
        start += len(batch)
        usable += probe(batch, problems, on_bad_file, frame)
    return usable


def probe(records: list[Record], problems: list[Problem], on_bad_file: str = "skip", frame: int = 0) -> list[Record]:
    """Decode each record once (threads: decoding is I/O and C code) and fill in what was seen."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda record: _probe_one(record, frame), records))
    usable = []
    for record, error in zip(records, results):
        if error is None:
            usable.append(record)
            continue
        if on_bad_file == "fail":
            raise DataError(f"{error} (stopping: --on-bad-file fail; use --on-bad-file skip to skip it)")
        problems.append(Problem(record.rel_path, str(error).replace(str(record.path) + ": ", ""), error.kind))
    return usable


def _probe_one(record: Record, frame: int = 0) -> DecodeError | None:
    try:
        decoded = decode(record.path, frame=frame)
    except DecodeError as error:
        return error
    except Exception as error:  # a decoder bug on one file must not stop a 100k-image scan
        return DecodeError(f"{record.path}: could not decode ({type(error).__name__}: "
                           f"{one_line(error, 160)})", "decoder failure")
    if decoded.synthetic:
        return DecodeError(f"{record.path}: made by rareaug (its PNG carries the synthetic marker), so never real "
                           "data; move it out of the data folder", "synthetic image")
    record.width, record.height = decoded.original_size
    record.mode, record.bit_depth = decoded.mode, decoded.bit_depth
    record.thumb = thumbnail(decoded)
    if record.patient is None and decoded.patient_id:
        record.patient = decoded.patient_id
    return None

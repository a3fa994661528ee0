"""`adapt --unlabeled DIR`: extra images of the domain, checked against the run's held-out images.

An unlabeled image that (nearly) copies a validation or test image would leak it into the adapted model, so
each is compared with them by the near-duplicate rule the split's leak check uses; a DICOM whose patient is in
another split is refused too (the only case where the patient is known: the split stores keys only hashed).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from data_adapters import DecodeError, decode
from data_adapters.decode import is_dicom_file, is_image_file
from data_adapters.layouts.common import is_rareaug_folder, rareaug_folders
from data_adapters.thumbnail import thumbnail

from ..errors import RareaugError
from ..near_duplicates import NearDuplicates
from ..split import SplitRow


@dataclasses.dataclass
class UnlabeledImage:
    id: str  # u00001 ...: ids only ever leave this module
    path: Path
    thumb: np.ndarray  # 16-px grayscale, for the near-duplicate check
    patient: str | None  # sha256 of the DICOM PatientID, in memory only


def scan_unlabeled(folder: str, run: Path, frame: int = 0) -> tuple[list[UnlabeledImage], dict]:
    """Every decodable image under `folder` (read only), in path order, and what was left out: unreadable files,
    and rareaug's own outputs (images it generated, run and export folders), which are never real data."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise RareaugError(f"--unlabeled {folder}: no such folder; give a folder of images of the domain")
    if is_rareaug_folder(root) or run.resolve().is_relative_to(root.resolve()) or \
            root.resolve().is_relative_to(run.resolve()):
        raise RareaugError(f"--unlabeled {folder}: a rareaug run or export folder (or one holding the run); its images "
                           "are rareaug's own, never new real data; give a folder of real images")
    outputs = [path.resolve() for path in rareaug_folders(root)]
    files = sorted(path for path in root.rglob("*") if path.is_file() and not path.name.startswith(".")
                   and (is_image_file(path) or is_dicom_file(path))
                   and not any(path.resolve().is_relative_to(output) for output in outputs))
    images, counts = [], {"unreadable": 0, "synthetic": 0, "in_rareaug_folders": len(outputs)}
    digest = hashlib.sha256()
    for path in files:
        try:
            decoded = decode(path, frame=frame)
        except DecodeError:
            counts["unreadable"] += 1
            continue
        if decoded.synthetic:
            counts["synthetic"] += 1
            continue
        image = UnlabeledImage(f"u{len(images) + 1:05d}", path, thumbnail(decoded), _patient(path))
        digest.update(hashlib.sha256(path.read_bytes()).digest())
        images.append(image)
    if not images:
        raise RareaugError(f"--unlabeled {folder}: no readable real image in it ({counts['unreadable']} unreadable, "
                           f"{counts['synthetic']} made by rareaug); give a folder of PNG, JPEG, TIFF or DICOM images")
    counts["content"] = digest.hexdigest()[:16]  # the images' bytes: a changed folder is another adapted model
    return images, counts


def held_out_keys(rows: list[SplitRow]) -> dict[str, tuple[np.ndarray | None, str | None]]:
    """Each row's thumbnail (None when it no longer decodes) and DICOM patient key, read once for every fold."""
    keys = {}
    for row in rows:
        try:
            thumb = thumbnail(decode(row.abs_path))
        except DecodeError:
            thumb = None
        keys[row.id] = (thumb, _patient(row.abs_path))
    return keys


def accepted(images: list[UnlabeledImage], held_out: list[SplitRow],
             keys: dict[str, tuple[np.ndarray | None, str | None]]) -> tuple[list[UnlabeledImage], dict[str, int]]:
    """The images that copy no held-out image and share no held-out patient, and the counts of each refusal.
    The near-duplicate rule is calibrated on the held-out and unlabeled images together."""
    thumbs = [keys[row.id][0] for row in held_out if keys[row.id][0] is not None]
    patients = {keys[row.id][1] for row in held_out if keys[row.id][1]}
    index = NearDuplicates(thumbs + [image.thumb for image in images])
    copies = index.copied(np.arange(len(thumbs), index.size), np.arange(len(thumbs)))
    kept, near, same_patient = [], 0, 0
    for image, copy in zip(images, copies):
        if image.patient and image.patient in patients:
            same_patient += 1
        elif copy:
            near += 1
        else:
            kept.append(image)
    return kept, {"used": len(kept), "near_duplicates_of_held_out": near, "held_out_patients": same_patient}


def _patient(path: Path) -> str | None:
    if not is_dicom_file(path):
        return None
    import pydicom

    try:
        patient = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID", ""))
    except Exception:  # pydicom raises many types; a file without a readable patient simply has none known
        return None
    return hashlib.sha256(patient.encode()).hexdigest() if patient.strip() else None

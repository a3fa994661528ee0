"""Tiny generated fixtures for every layout. Each image is distinct noise, so no leakage warnings fire
unless a test plants a duplicate on purpose. No test downloads: HF_HUB_OFFLINE=1 for the whole session (set
before anything imports huggingface_hub, which reads it once), unless a test unsets it with monkeypatch and
replaces the download functions (tests/test_downloads.py)."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from rareaug.cli import app  # noqa: E402

_counter = iter(range(1_000_000))


def write_image(path: Path, size: int = 32, mode: str = "L") -> Path:
    """A distinct random picture (its own seed), in the format the suffix says."""
    rng = np.random.default_rng(next(_counter))
    shape = (size, size) if mode == "L" else (size, size, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def write_mask(path: Path, size: int = 32, box=(4, 6, 12, 20)) -> Path:
    mask = np.zeros((size, size), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def write_dicom(path: Path, patient_name: str, patient_id: str, seed: int) -> Path:
    """A real CR radiograph (pydicom-data) with its pixels replaced and its patient tags set."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 1024, (64, 64), dtype=np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds.PatientName, ds.PatientID = patient_name, patient_id
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def folder_data(tmp_path) -> Path:
    root = tmp_path / "tiles"
    for i in range(10):
        write_image(root / "crack" / f"crack {i} ü.png")
    for i in range(20):
        write_image(root / "normal" / f"n{i:02d}.jpg", mode="RGB")
    for i in range(6):
        write_image(root / "scratch" / "batch2" / f"s{i}.png")  # nested: still class "scratch"
    (root / "normal" / "notes.txt").write_text("not an image")
    (root / "normal" / ".DS_Store").write_bytes(b"junk")
    return root


@pytest.fixture
def mt_data(tmp_path) -> Path:
    root = tmp_path / "Magnetic-tile-defect-datasets"
    for i in range(8):
        write_image(root / "MT_Crack" / "Imgs" / f"exp{i}_num_{i}.jpg")
        write_mask(root / "MT_Crack" / "Imgs" / f"exp{i}_num_{i}.png")
    for i in range(6):
        write_image(root / "MT_Blowhole" / f"exp{i}_num_{i}.jpg")  # no Imgs/ level
        write_mask(root / "MT_Blowhole" / f"exp{i}_num_{i}.png")
    for i in range(20):
        write_image(root / "MT_Free" / "Imgs" / f"free{i}.jpg")
        write_mask(root / "MT_Free" / "Imgs" / f"free{i}.png", box=(0, 0, 0, 0))
    return root


@pytest.fixture
def mvtec_data(tmp_path) -> Path:
    root = tmp_path / "mvtec" / "bottle"
    for i in range(12):
        write_image(root / "train" / "good" / f"{i:03d}.png", mode="RGB")
    for i in range(4):
        write_image(root / "test" / "good" / f"{i:03d}.png", mode="RGB")
    for i in range(8):
        write_image(root / "test" / "broken_large" / f"{i:03d}.png", mode="RGB")
        write_mask(root / "ground_truth" / "broken_large" / f"{i:03d}_mask.png")
    for i in range(3):
        write_image(root / "test" / "contamination" / f"{i:03d}.png", mode="RGB")
        write_mask(root / "ground_truth" / "contamination" / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def nih_data(tmp_path) -> Path:
    """24 patients with 1-2 images each; 8 patients have two pneumothorax images each."""
    root = tmp_path / "nih"
    rows, test_list, trainval = [], [], []
    image_number = 0
    for patient in range(1, 25):
        for follow_up in range(2 if patient % 3 == 0 else 1 + patient % 2):
            image_number += 1
            name = f"{patient:08d}_{follow_up:03d}.png"
            if patient % 3 == 0:
                labels = "Pneumothorax" if follow_up == 0 else "Pneumothorax|Effusion"
            elif patient % 4 == 1:
                labels = "Effusion|Infiltration"
            else:
                labels = "No Finding"
            write_image(root / f"images_{1 + patient % 2:03d}" / "images" / name)
            rows.append({"Image Index": name, "Finding Labels": labels, "Follow-up #": follow_up,
                         "Patient ID": patient, "Patient Age": 40, "Patient Gender": "M", "View Position": "PA"})
            (test_list if patient > 20 else trainval).append(name)
    rows.append({"Image Index": "99999999_000.png", "Finding Labels": "No Finding", "Follow-up #": 0,
                 "Patient ID": 99999999, "Patient Age": 1, "Patient Gender": "F", "View Position": "PA"})
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (root / "test_list.txt").write_text("\n".join(test_list) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(trainval) + "\n")
    return root


@pytest.fixture
def dicom_data(tmp_path) -> Path:
    """A DICOM folder: 8 patients, 2 images each, files without suffix among them; real patient tags."""
    root = tmp_path / "dicom"
    for patient in range(8):
        for k in range(2):
            label = "pneumothorax" if patient < 4 else "normal"
            name = f"IM{patient}{k}" if k else f"img{patient}{k}.dcm"
            write_dicom(root / label / name, f"Doe^Jane{patient}", f"PID-SECRET-{patient:03d}", seed=patient * 10 + k)
    return root


@pytest.fixture
def csv_data(tmp_path) -> Path:
    root = tmp_path / "listed"
    rows = []
    for i in range(8):
        rows.append((write_image(root / "a" / f"{i}.png").relative_to(root).as_posix(), "lesion", f"p{i}"))
    for i in range(16):
        rows.append((write_image(root / "b" / f"{i}.png").relative_to(root).as_posix(), "normal", f"q{i}"))
    outside = write_image(tmp_path / "outside.png")
    rows.append(("../outside.png", "lesion", "p99"))
    rows.append((str(outside), "normal", "q99"))
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows(rows)
    return root / "labels.csv"


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache of our own, so that what this machine happens to have cached cannot matter."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture
def invoke(runner):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return run


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file's size and mtime: inputs must stay untouched."""
    return {p.as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def fitted_run(factory, n_rare: int, n_normal: int, fit_steps: int = 3) -> Path:
    """A run directory with a LoFT fit on the tiny model (64 px), for tests that build on fit."""
    from typer.testing import CliRunner

    root = factory.mktemp("data")
    for i in range(n_rare):
        write_image(root / "crack" / f"c{i}.png")
    for i in range(n_normal):
        write_image(root / "normal" / f"n{i}.png")
    run = factory.mktemp("runs") / "run"
    result = CliRunner().invoke(app, ["fit", "--data", str(root), "--rare", "crack", "--run", str(run),
                                      "--base-model", "tiny", "--resolution", "64", "--steps", str(fit_steps)])
    assert result.exit_code == 0, result.stderr
    return run


@pytest.fixture(scope="module")
def fitted_loft(tmp_path_factory):
    """One LoFT fit on the tiny model (8 rare, 12 normal images), made once per test module."""
    return fitted_run(tmp_path_factory, n_rare=8, n_normal=12)


@pytest.fixture
def loft_run(fitted_loft, tmp_path):
    """A copy of `fitted_loft` that a test may change."""
    return shutil.copytree(fitted_loft, tmp_path / "run")


def pool_manifest(folder: Path) -> list[dict]:
    """A pool's manifest.csv rows."""
    with open(folder / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))

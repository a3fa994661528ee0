"""`rareaug report` and `rareaug export` on a small swept run (tiny models, CPU)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import fitted_run, tree_snapshot
from PIL import Image
from typer.testing import CliRunner

from rareaug.cli import app
from rareaug.split import read_split

GRID = ("--model", "tiny-resnet18", "--seeds", "2", "--steps", "4", "--batch-size", "8", "--no-pretrained",
        "--generate-steps", "2", "--guard-threshold", "0.01", "--ratios", "0,1,2", "--methods", "loft,classic")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    run = fitted_run(tmp_path_factory, n_rare=10, n_normal=16)
    result = CliRunner().invoke(app, ["sweep-ratio", "--run", str(run), *GRID])
    assert result.exit_code == 0, result.stderr
    return run


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_report_is_one_self_contained_page_with_every_section(swept):
    code, out, err = _invoke("report", "--run", swept)
    assert code == 0, err
    page = (swept / "report.html").read_text()
    for section in ("Recommendation", "Metrics against the ratio", "Real and synthetic images", "LoFT fusions",
                    "(an estimate)", "Memorisation guard", "Data", "How this run was made", "real training images"):
        assert section in page, section
    # Nothing to fetch: every image is inline, no script, no external address.
    assert "src=\"data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    # Only opaque ids: no data folder path, no original file name.
    rows = read_split(swept / "split.csv")
    assert rows[0].root not in page
    assert not any(f"{row.abs_path.name}" in page for row in rows)
    timings = json.loads((swept / "timings.json").read_text())
    assert {"fit loft", "sweep-ratio"} <= set(timings) and timings["fit loft"]["seconds"] > 0


def test_no_real_images_leaves_every_real_pixel_out(swept, tmp_path):
    code, _, err = _invoke("report", "--run", swept, "--no-real-images")
    assert code == 0, err
    page = (swept / "report.html").read_text()
    assert "real training images" not in page and "LoFT fusions" not in page
    assert "Real images are left out" in page


def test_report_renders_in_headless_chromium(swept, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    _invoke("report", "--run", swept)
    shot = tmp_path / "shot.png"
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--window-size=1280,2400", f"--screenshot={shot}", "--enable-logging=stderr", "--v=0",
                             (swept / "report.html").resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines()
               if "CONSOLE" in line or "Failed to load resource" in line or "net::ERR" in line]
    assert not console, console
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text, plots and images, not a blank page


def test_export_recommended_gives_real_train_plus_synthetic_with_provenance(swept, tmp_path):
    data_root = read_split(swept / "split.csv")[0].root
    before = tree_snapshot(Path(data_root))
    out = tmp_path / "export"
    code, stdout, err = _invoke("export", "--run", swept, "--recommended", "--out", out)
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    train = [r for r in read_split(swept / "split.csv") if r.split == "train"]
    real = [r for r in rows if r["source"] == "real"]
    synthetic = [r for r in rows if r["source"] == "synthetic"]
    assert sorted(r["id"] for r in real) == sorted(r.id for r in train)
    ratio = json.loads(
        (swept / "sweep" / "summary.json").read_text())["models"]["tiny-resnet18"]["loft"]["recommended_ratio"]
    assert len(synthetic) == round(ratio * sum(r.rare for r in train))
    assert all((out / r["file"]).is_file() for r in rows)
    assert all(r["loras"] and r["variant"].startswith("loft") for r in synthetic)
    assert tree_snapshot(Path(data_root)) == before  # the data folder is only read


def test_export_refuses_what_it_cannot_do_in_one_line(swept, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for args, message in [(("--ratio", "1", "--out", tmp_path / "full"), "not empty"),
                          (("--ratio", "50", "--out", tmp_path / "a"), "needs"),
                          (("--out", tmp_path / "b"), "exactly one of"),
                          (("--ratio", "1", "--method", "chimera", "--out", tmp_path / "c"), "no chimera pool")]:
        code, _, err = _invoke("export", "--run", swept, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "a").exists()


def test_export_of_dicom_writes_plain_pngs_without_patient_tags(dicom_data, tmp_path):
    """Real images are decoded and re-encoded: no DICOM tag, not even in a file without a suffix, leaves."""
    run = tmp_path / "run"
    code, _, err = _invoke("inspect", "--data", dicom_data, "--rare", "pneumothorax", "--run", run)
    assert code == 0, err
    out = tmp_path / "export"
    code, _, err = _invoke("export", "--run", run, "--ratio", "0", "--out", out)
    assert code == 0, err
    files = [p for p in out.rglob("*") if p.is_file() and p.name not in ("manifest.csv", ".rareaug")]
    assert files and all(p.suffix == ".png" for p in files)
    assert (out / ".rareaug").is_file()  # inspect leaves the export out if it ever lands in a data folder
    for path in [*files, out / "manifest.csv"]:
        data = path.read_bytes()
        assert b"Doe^Jane" not in data and b"PID-SECRET" not in data
    assert Image.open(files[0]).mode in ("I;16", "I")  # 16-bit grey keeps the radiograph's depth

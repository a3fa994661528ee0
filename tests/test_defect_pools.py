"""`--method cutpaste` / `--method perlin` pools on the Magnetic Tile fixture: masks aligned with their images,
seeded per slot, in the sweep, the report and `export --masks`; refused where there is no one normal class."""
from __future__ import annotations

import csv
import shutil
from importlib.resources import files

import numpy as np
import pytest
from conftest import pool_manifest
from PIL import Image
from typer.testing import CliRunner

from rareaug.cli import app
from rareaug.images import model_input
from rareaug.split import read_split

GRID = ("--model", "tiny-resnet18", "--seeds", "1", "--steps", "2", "--batch-size", "8", "--no-pretrained",
        "--input-size", "32", "--ratios", "0,1", "--methods", "cutpaste,perlin")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """inspect (the split) -> sweep-ratio, which makes both defect pools on demand; no model is fitted."""
    from conftest import mt_data

    data = mt_data.__wrapped__(tmp_path_factory.mktemp("data"))
    run = tmp_path_factory.mktemp("runs") / "run"
    recipe = run.parent / "tiles.yaml"  # the magnetic_tile recipe at 64 px, for speed
    recipe.write_text((files("rareaug.recipes") / "magnetic_tile.yaml").read_text().replace("512", "64"))
    for args in (("inspect", "--data", data, "--rare", "Crack", "--run", run, "--config", recipe),
                 ("sweep-ratio", "--run", run, "--config", recipe, *GRID)):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.stderr
    return run


@pytest.mark.parametrize("method", ["cutpaste", "perlin"])
def test_each_image_is_its_normal_image_outside_its_mask(swept, method):
    folder = swept / "synthetic" / method
    rows = {row.id: row for row in read_split(swept / "split.csv")}
    kept = [r for r in pool_manifest(folder) if r["kept"] == "1"]
    assert kept and all(r["mask"] == f"masks/{r['file']}" for r in kept)
    for r in kept:
        image = np.asarray(Image.open(folder / r["file"]), dtype=np.int16)
        mask = np.asarray(Image.open(folder / r["mask"]))
        assert mask.shape == image.shape and set(np.unique(mask)) == {0, 255}
        normal, donor = rows[r["source_id"]], rows[r["donor_id"]]
        assert normal.cls == "Free" and donor.rare and donor.split == "train"
        expected = model_input(normal.abs_path, 64, "mask-box", "center", normal.abs_mask)[0]
        expected = np.round((expected.numpy() + 1) * 127.5).astype(np.int16)
        outside = mask == 0
        assert np.abs(image[outside] - expected[outside]).max() <= 1
        assert np.abs(image[~outside] - expected[~outside]).mean() > 1  # something was pasted or blended there


def test_a_defect_pool_regenerates_the_same_bytes(swept, tmp_path):
    run = shutil.copytree(swept, tmp_path / "run")
    folder = run / "synthetic" / "cutpaste"
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("s*.png")}
    shutil.rmtree(folder)
    result = CliRunner().invoke(app, ["generate", "--run", str(run), "--method", "cutpaste", "--ratio", "1",
                                      "--config", str(swept.parent / "tiles.yaml")])
    assert result.exit_code == 0, result.stderr
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("s*.png")} == before


def test_defect_methods_are_in_the_sweep_the_report_and_export_masks(swept, tmp_path):
    with open(swept / "sweep" / "metrics.csv", newline="") as handle:
        assert {row["method"] for row in csv.DictReader(handle)} == {"none", "cutpaste", "perlin"}
    result = CliRunner().invoke(app, ["report", "--run", str(swept)])
    assert result.exit_code == 0, result.stderr
    page = (swept / "report.html").read_text()
    assert "Defects with their masks" in page and "not guarded" in page
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", "--run", str(swept), "--out", str(out), "--method", "perlin",
                                      "--ratio", "1", "--masks"])
    assert result.exit_code == 0, result.stderr
    synthetic = sorted(p.name for p in (out / "test" / "Crack").glob("perlin-*.png"))
    assert synthetic and all((out / "ground_truth" / "Crack" / f"{name[:-4]}_mask.png").is_file() for name in synthetic)


def test_defect_methods_need_one_normal_class(invoke, folder_data, tmp_path):
    run = tmp_path / "run"
    assert invoke("inspect", "--data", folder_data, "--rare", "crack", "--run", run)[0] == 0
    code, _, err = invoke("generate", "--run", run, "--method", "perlin", "--n", "2")
    assert code != 0 and "normal class" in err and "Traceback" not in err

"""`rareaug export --masks`: the MVTec AD / anomalib layout, on the MVTec fixture with a hand-made defect pool."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tree_snapshot, write_mask
from PIL import Image

from data_adapters import load_mask, mask_box
from data_adapters.layouts import mvtec
from rareaug.errors import RareaugError
from rareaug.export import MANIFEST_COLUMNS, defect_folder
from rareaug.generate.manifest import COLUMNS, image_file, mask_file, save_mask, save_png
from rareaug.split import SplitRow, read_split

BOX = (4, 6, 12, 20)  # conftest.write_mask's box: (x0, y0, x1, y1), not symmetric, so a transposed mask shows
POOL_BOX = (10, 3, 30, 9)
POOL = "cutpaste-test"


def _pool(run: Path, method: str, kept: int, with_masks: bool, name: str = POOL) -> Path:
    """A pool as generate writes it: marked PNGs, masks/s<slot>.png (0 / 255) and manifest.csv; 48x40 images, not
    the real ones' 32x32, so each mask must follow its own image."""
    folder = run / "synthetic" / name
    rows = []
    for slot in range(kept):
        save_png(folder / image_file(slot), torch.rand(3, 40, 48), False, name, slot)
        mask = ""
        if with_masks:
            tensor = torch.zeros(40, 48)
            x0, y0, x1, y1 = POOL_BOX
            tensor[y0:y1, x0:x1] = 1
            save_mask(folder / mask_file(slot), tensor)
            mask = mask_file(slot)
        rows.append({"file": image_file(slot), "pool_index": slot, "class": "broken_large", "method": method,
                     "kept": 1, "mask": mask, "nearest_real_id": "r0001", "seed": slot})
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    (folder / "summary.json").write_text(json.dumps({"variant": name, "method": method, "kept": kept}))
    return folder


@pytest.fixture
def mvtec_run(mvtec_data, tmp_path, invoke):
    """A run on the MVTec fixture (rare: broken_large) where one rare image has no mask and one mask is 0 / 1."""
    (mvtec_data / "ground_truth" / "broken_large" / "000_mask.png").unlink()
    path = mvtec_data / "ground_truth" / "broken_large" / "001_mask.png"
    Image.fromarray((np.asarray(Image.open(path)) > 0).astype(np.uint8)).save(path)  # 0 / 1, as some datasets have
    run = tmp_path / "run"
    code, _, err = invoke("inspect", "--data", mvtec_data, "--rare", "broken_large", "--run", run)
    assert code == 0, err
    return run


def _manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        return list(reader)


def test_masks_export_writes_the_mvtec_layout_with_aligned_masks(mvtec_run, mvtec_data, tmp_path, invoke):
    _pool(mvtec_run, "cutpaste", kept=20, with_masks=True)
    before = tree_snapshot(mvtec_data), tree_snapshot(mvtec_run)
    out = tmp_path / "export" / "bottle"
    code, stdout, err = invoke("export", "--run", mvtec_run, "--method", "cutpaste", "--ratio", "2", "--masks",
                               "--out", out)
    assert code == 0, err
    assert (tree_snapshot(mvtec_data), tree_snapshot(mvtec_run)) == before  # the data and the run are only read
    train = [row for row in read_split(mvtec_run / "split.csv") if row.split == "train"]
    normal, rare = [r for r in train if not r.rare], [r for r in train if r.rare]
    synthetic = 2 * len(rare)
    masked_real = [r for r in rare if r.mask]

    # 1. Exactly train/good, test/<defect>, ground_truth/<defect>, manifest.csv and the marker; nothing else.
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    good = {f"train/good/{r.id}.png" for r in normal}
    tests = {f"test/broken_large/{r.id}.png" for r in rare} | {
        f"test/broken_large/{POOL}-{image_file(slot)}" for slot in range(synthetic)}
    truths = {f"ground_truth/broken_large/{r.id}_mask.png" for r in masked_real} | {
        f"ground_truth/broken_large/{POOL}-s{slot:06d}_mask.png" for slot in range(synthetic)}
    assert files == good | tests | truths | {"manifest.csv", ".rareaug"}

    # 2. The manifest: every file, its class and source, and its mask ('' where there is none).
    rows = {row["file"]: row for row in _manifest(out)}
    assert set(rows) == good | tests
    assert all(rows[f]["class"] == "good" and rows[f]["mask"] == "" for f in good)
    assert {rows[f]["mask"] for f in tests} - {""} == truths
    assert sum(rows[f]["source"] == "synthetic" for f in tests) == synthetic
    assert all(rows[f]["variant"] == POOL and rows[f]["seed"] for f in tests if rows[f]["source"] == "synthetic")

    # 3. Masks: 8-bit 0 / 255, the size of their image, where the data (or the pool) put the defect.
    by_id = {r.id: r for r in rare}
    for image_name in tests:
        mask_name = rows[image_name]["mask"]
        if not mask_name:
            continue
        image, mask = Image.open(out / image_name), Image.open(out / mask_name)
        assert mask.mode == "L" and mask.size == image.size
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        if rows[image_name]["source"] == "real":
            source = by_id[rows[image_name]["id"]]
            assert mask_box(load_mask(out / mask_name)) == BOX
            assert np.array_equal(load_mask(out / mask_name), load_mask(source.abs_mask))
        else:
            assert image.size == (48, 40) and mask_box(load_mask(out / mask_name)) == POOL_BOX

    # 4. One summary line with the count of rare images without a mask.
    missing = len(rare) - len(masked_real)
    assert missing == 1  # the fixture's 000.png, which the split put into train
    summary = " ".join(stdout.split())  # the console wraps long lines
    assert summary.count("MVTec layout") == 1, stdout
    assert (f"MVTec layout: train/good {len(normal)} (good), test/broken_large {len(rare) + synthetic}, "
            f"ground_truth/broken_large {len(masked_real) + synthetic} masks; 1 rare images have no mask (1 real "
            "without a mask file, 0 synthetic from a pool without masks; their manifest.csv mask is empty)") in summary

    # 5. Round trip: the mvtec layout reader finds the normal images as good and the rare ones with their masks.
    assert mvtec.detect(out)
    scan = mvtec.scan(out)
    found = {record.rel_path: record for record in scan.records}
    assert set(found) == good | tests
    assert all(found[f].label == "good" and found[f].fixed_split == "trainval" for f in good)
    assert all(found[f].label == "broken_large" and found[f].rel_mask_path == rows[f]["mask"] for f in tests)


def test_masks_export_of_a_pool_without_masks_says_how_many_have_none(mvtec_run, tmp_path, invoke):
    """Pools of methods that make no masks (loft here) go to test/<defect> without ground truth."""
    _pool(mvtec_run, "loft", kept=10, with_masks=False, name="loft-test")
    out = tmp_path / "export"
    code, stdout, err = invoke("export", "--run", mvtec_run, "--ratio", "1", "--masks", "--out", out)
    assert code == 0, err
    rows = _manifest(out)
    synthetic = [row for row in rows if row["source"] == "synthetic"]
    assert synthetic and all(row["file"].startswith("test/broken_large/loft-test-") and not row["mask"]
                             for row in synthetic)
    assert not list((out / "ground_truth").rglob("loft-test-*"))
    real_missing = sum(row["source"] == "real" and row["file"].startswith("test/") and not row["mask"] for row in rows)
    missing = real_missing + len(synthetic)
    assert f"{missing} rare images have no mask ({real_missing} real without a mask file, {len(synthetic)} " \
           "synthetic from a pool without masks" in " ".join(stdout.split())


def test_class_folder_export_keeps_its_layout_with_an_empty_mask_column(mvtec_run, tmp_path, invoke):
    out = tmp_path / "export"
    code, stdout, err = invoke("export", "--run", mvtec_run, "--ratio", "0", "--out", out)
    assert code == 0, err
    rows = _manifest(out)
    assert rows and all(row["file"].split("/")[0] in ("good", "broken_large") and row["mask"] == "" for row in rows)
    assert "MVTec layout" not in stdout


def test_masks_export_refuses_a_mask_it_cannot_align_and_leaves_nothing(mvtec_run, mvtec_data, tmp_path, invoke):
    rare = [r for r in read_split(mvtec_run / "split.csv") if r.split == "train" and r.rare and r.mask]
    write_mask(rare[0].abs_mask, size=16)  # the data changed after the run: a 16x16 mask for a 32x32 image
    out = tmp_path / "export"
    code, _, err = invoke("export", "--run", mvtec_run, "--ratio", "0", "--masks", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "mask is 16x16, its image 32x32" in " ".join(err.split()) and "without --masks" in err
    assert not out.exists() and not list(tmp_path.glob(".export.*"))  # no half folder, no staging left behind

    write_mask(rare[0].abs_mask)
    pool = _pool(mvtec_run, "cutpaste", kept=20, with_masks=True)
    (pool / mask_file(3)).unlink()
    code, _, err = invoke("export", "--run", mvtec_run, "--method", "cutpaste", "--ratio", "2", "--masks",
                          "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "mask missing" in err, err
    assert not out.exists() and not list(tmp_path.glob(".export.*"))


def _rows(*classes: str) -> list[SplitRow]:
    return [SplitRow(f"r{i}", "/data", f"{i}.png", "", cls, True, "train", 0, "") for i, cls in enumerate(classes)]


@pytest.mark.parametrize("name, folder", [("broken_large", "broken_large"), ("MT_Crack", "MT_Crack"),
                                          ("broken large/ü", "broken_large_ü"), ("../crack", "crack"),
                                          (".hidden", "hidden")])
def test_defect_folder_is_a_safe_visible_name(name, folder):
    assert defect_folder(_rows(name)) == folder


@pytest.mark.parametrize("name, message", [("?!/", "no letter or digit"), ("..", "no letter or digit"),
                                           ("good", "name for normal images")])
def test_defect_folder_refuses_names_it_cannot_use_in_one_line(name, message):
    with pytest.raises(RareaugError, match=message) as error:
        defect_folder(_rows(name))
    assert "\n" not in str(error.value) and "without --masks" in str(error.value)

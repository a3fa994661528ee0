"""Each layout reports the right counts through `rareaug inspect --json` (masks never counted)."""
from __future__ import annotations

import json

from conftest import tree_snapshot

from data_adapters import detect_layout, load_dataset


def inspect_json(invoke, *args):
    code, out, err = invoke("inspect", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_folder_layout_counts_nested_and_skips_non_images(invoke, folder_data):
    summary = inspect_json(invoke, "--data", folder_data, "--rare", "CRACK")
    assert summary["layout"] == "folder"
    assert summary["classes"] == {"crack": 10, "normal": 20, "scratch": 6}
    assert summary["rare"] == "crack" and summary["n_rare"] == 10
    # Folders: every non-rare class is a negative by default.
    assert summary["n_images"] == 36
    assert sum(summary["splits"][s].get("crack", 0) for s in ("train", "val", "test")) == 10
    assert summary["splits"]["val"]["crack"] >= 1 and summary["splits"]["test"]["crack"] >= 1
    assert summary["n_patients"] is None
    assert summary["problems"] == []
    assert summary["modes"] == {"RGB": 20, "L": 16}


def test_mt_layout_masks_are_not_images(invoke, mt_data):
    summary = inspect_json(invoke, "--data", mt_data, "--rare", "crack")
    assert summary["layout"] == "mt"
    assert summary["classes"] == {"Blowhole": 6, "Crack": 8, "Free": 20}
    assert summary["rare"] == "Crack"
    # Default negatives: MT_Free only.
    assert summary["n_images"] == 28
    other = inspect_json(invoke, "--data", mt_data, "--rare", "crack", "--negatives", "all-other")
    assert other["n_images"] == 34


def test_mt_records_keep_their_mask(mt_data):
    dataset = load_dataset(mt_data, rare="crack")
    crack = [r for r in dataset.records if r.is_rare]
    assert len(crack) == 8
    assert all(r.mask_path is not None and r.mask_path.suffix == ".png" for r in crack)
    assert all(r.path.suffix == ".jpg" for r in dataset.records)
    blowhole = load_dataset(mt_data, rare="blowhole").records
    assert sum(r.is_rare and r.mask_path is not None for r in blowhole) == 6


def test_mvtec_keeps_its_own_split(invoke, mvtec_data, tmp_path):
    summary = inspect_json(invoke, "--data", mvtec_data, "--rare", "broken_large", "--run", tmp_path / "run")
    assert summary["layout"] == "mvtec" and summary["recipe"] == "mvtec"
    assert summary["classes"] == {"broken_large": 8, "contamination": 3, "good": 16}
    splits = summary["splits"]
    assert splits["test"]["good"] == 4  # test/good stays test
    assert splits["train"]["good"] + splits["val"]["good"] == 12  # train/good -> train and val only
    assert sum(splits[s]["broken_large"] for s in splits) == 8
    assert splits["test"]["broken_large"] >= 1 and splits["val"]["broken_large"] >= 1
    rows = (tmp_path / "run" / "split.csv").read_text().splitlines()
    masked = [line for line in rows if "broken_large" in line and "_mask.png" in line]
    assert len(masked) == 8  # each rare image carries its mask path


def test_mvtec_parent_folder_with_one_category_is_accepted(invoke, mvtec_data):
    summary = inspect_json(invoke, "--data", mvtec_data.parent, "--rare", "broken_large")
    assert summary["layout"] == "mvtec"


def test_nih_groups_patients_and_respects_lists(invoke, nih_data, tmp_path):
    summary = inspect_json(invoke, "--data", nih_data, "--rare", "pneumothorax", "--run", tmp_path / "run")
    assert summary["layout"] == "nih-cxr14" and summary["recipe"] == "chest_xray"
    assert summary["rare"] == "Pneumothorax"
    assert summary["classes"]["Pneumothorax"] == 16
    assert summary["classes"]["Effusion"] == 16  # multi-label: counted per finding
    assert len(summary["problems"]) == 1 and "99999999_000.png" in summary["problems"][0]["reason"]
    assert summary["n_patients"] is not None
    rows = _rows(tmp_path / "run")
    # test_list.txt holds patients 21-24: exactly their images are test.
    assert {r["split"] for r in rows if int(r["path"].split("/")[-1][:8]) > 20} == {"test"}
    assert {r["split"] for r in rows if int(r["path"].split("/")[-1][:8]) <= 20} <= {"train", "val"}
    _assert_patients_in_one_split(rows)
    # Default negatives are "No Finding" only; all-other adds the other findings.
    assert set(summary["splits"]["train"]) <= {"Pneumothorax", "No Finding"}
    other = inspect_json(invoke, "--data", nih_data, "--rare", "pneumothorax", "--negatives", "all-other")
    assert "other findings" in {c for split in other["splits"].values() for c in split}


def test_nih_max_rare_moves_the_rest_to_test(invoke, nih_data):
    full = inspect_json(invoke, "--data", nih_data, "--rare", "Pneumothorax")
    capped = inspect_json(invoke, "--data", nih_data, "--rare", "Pneumothorax", "--max-rare", "6")
    kept = capped["splits"]["train"]["Pneumothorax"] + capped["splits"]["val"]["Pneumothorax"]
    assert kept <= 6
    assert capped["n_rare"] == full["n_rare"] == 16  # nothing dropped: the surplus is test data


def test_csv_layout_rejects_paths_outside_root(invoke, csv_data):
    summary = inspect_json(invoke, "--data", csv_data, "--rare", "lesion")
    assert summary["layout"] == "csv"
    assert summary["classes"] == {"lesion": 8, "normal": 16}
    reasons = {p["path"]: p["reason"] for p in summary["problems"]}
    assert "row 26" in reasons["labels.csv:26"] and "escapes" in reasons["labels.csv:26"]
    assert "row 27" in reasons["labels.csv:27"] and "escapes" in reasons["labels.csv:27"]
    assert summary["n_patients"] == 24
    code, _, err = invoke("inspect", "--data", csv_data, "--rare", "lesion", "--on-bad-file", "fail")
    assert code == 2 and "row 26" in err and len(err.strip().splitlines()) == 1


def test_dicom_folder_groups_by_patient_tag(invoke, dicom_data, tmp_path):
    summary = inspect_json(invoke, "--data", dicom_data, "--rare", "pneumothorax", "--run", tmp_path / "run",
                           "--test-fraction", "0.25")
    assert summary["classes"] == {"normal": 8, "pneumothorax": 8}  # files without suffix found by preamble
    assert summary["n_patients"] == 8
    assert summary["bit_depths"] == {"10": 16} and summary["modes"] == {"MONOCHROME1": 16}
    _assert_patients_in_one_split(_rows(tmp_path / "run"))


def test_layout_detection(folder_data, mt_data, mvtec_data, nih_data, csv_data):
    assert [detect_layout(p) for p in (folder_data, mt_data, mvtec_data, nih_data, csv_data)] == [
        "folder", "mt", "mvtec", "nih-cxr14", "csv"]


def test_inputs_are_never_written(invoke, mt_data, tmp_path):
    before = tree_snapshot(mt_data)
    inspect_json(invoke, "--data", mt_data, "--rare", "crack", "--run", tmp_path / "run")
    assert tree_snapshot(mt_data) == before


def _rows(run):
    import csv

    with open(run / "split.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_patients_in_one_split(rows):
    by_group = {}
    for row in rows:
        assert row["group"], "patients are known here: every row has a group hash"
        by_group.setdefault(row["group"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in by_group.values())
    assert len(by_group) < len(rows)  # several images per patient exist in these fixtures

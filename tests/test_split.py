"""The split: deterministic, grouped, stratified, frozen once written, with leakage warnings."""
from __future__ import annotations

import csv
import json
import shutil
from collections import Counter

import pytest
from conftest import write_image

from data_adapters import load_dataset
from rareaug.config import build_config
from rareaug.split import make_split


def _split(root, seed=0, **overrides):
    config = build_config(None, {"data.data": str(root), "data.rare": "crack", "seed": seed,
                                 **{k.replace("__", "."): v for k, v in overrides.items()}})
    dataset = load_dataset(root, rare="crack", seed=seed)
    return make_split(dataset.records, [], config)


def test_split_is_deterministic_and_stratified(folder_data):
    first, again = _split(folder_data), _split(folder_data)
    assert [(r.id, r.path, r.split) for r in first] == [(r.id, r.path, r.split) for r in again]
    other_seed = _split(folder_data, seed=1)
    assert [r.split for r in first] != [r.split for r in other_seed]
    counts = Counter((r.cls, r.split) for r in first)
    # 20% of every class to test, 20% of the rest to val (rounded), at least one rare image in each.
    assert counts["crack", "test"] == 2 and counts["crack", "val"] == 2 and counts["crack", "train"] == 6
    assert counts["normal", "test"] == 4 and counts["normal", "val"] == 3
    assert counts["scratch", "test"] + counts["scratch", "val"] >= 2


def test_ids_are_opaque_and_follow_sorted_paths(folder_data):
    rows = _split(folder_data)
    rare = [r for r in rows if r.rare]
    assert [r.id for r in rare] == [f"r{i:04d}" for i in range(1, 11)]
    assert [r.path for r in rare] == sorted(r.path for r in rare)
    assert all(r.id.startswith("n") for r in rows if not r.rare)


def test_folds_cover_every_non_test_image(folder_data):
    rows = _split(folder_data, split__folds=3)
    folds = Counter(r.fold for r in rows if r.split != "test")
    assert set(folds) == {0, 1, 2}
    assert all(r.fold == -1 for r in rows if r.split == "test")
    rare_folds = Counter(r.fold for r in rows if r.rare and r.split != "test")
    assert max(rare_folds.values()) - min(rare_folds.values()) <= 1


def test_min_rare_in_val_even_with_tiny_fraction(folder_data):
    rows = _split(folder_data, split__val_fraction=0.01)
    assert sum(r.rare and r.split == "val" for r in rows) == 1


def test_frozen_split_survives_another_seed(invoke, folder_data, tmp_path):
    run = tmp_path / "run"
    code, _, err = invoke("inspect", "--data", folder_data, "--rare", "crack", "--run", run, "--seed", "1")
    assert code == 0, err
    before = (run / "split.csv").read_bytes()
    code, out, err = invoke("inspect", "--data", folder_data, "--rare", "crack", "--run", run, "--seed", "7")
    assert code == 0, err
    assert (run / "split.csv").read_bytes() == before
    assert "frozen" in out


def test_frozen_split_refuses_another_rare_class(invoke, folder_data, tmp_path):
    run = tmp_path / "run"
    assert invoke("inspect", "--data", folder_data, "--rare", "crack", "--run", run)[0] == 0
    code, _, err = invoke("inspect", "--data", folder_data, "--rare", "scratch", "--run", run)
    assert code == 2
    assert "--rare" in err and "new --run" in err and len(err.strip().splitlines()) == 1


def test_frozen_split_refuses_other_data(invoke, folder_data, tmp_path):
    run = tmp_path / "run"
    assert invoke("inspect", "--data", folder_data, "--rare", "crack", "--run", run)[0] == 0
    elsewhere = shutil.copytree(folder_data, tmp_path / "copy")
    code, _, err = invoke("inspect", "--data", elsewhere, "--rare", "crack", "--run", run)
    assert code == 2 and "--data" in err


def test_test_data_folder_is_the_test_split_and_a_single_copy_is_flagged(invoke, folder_data, tmp_path):
    test_root = tmp_path / "held_out"
    (test_root / "crack").mkdir(parents=True)
    for i in range(6):
        write_image(test_root / "crack" / f"t{i}.png")
    # one train image leaks into test
    shutil.copy(folder_data / "crack" / "crack 0 ü.png", test_root / "crack" / "copy.png")
    for i in range(10):
        write_image(test_root / "normal" / f"u{i}.png")
    code, out, err = invoke("inspect", "--json", "--data", folder_data, "--rare", "crack", "--test-data", test_root)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["splits"]["test"] == {"crack": 7, "normal": 10}
    assert summary["splits"]["train"]["crack"] + summary["splits"]["val"]["crack"] == 10
    assert len(summary["leaks"]) == 1 and summary["leaks"][0]["distance"] == 0
    assert "test" in (summary["leaks"][0]["a_split"], summary["leaks"][0]["b_split"])
    assert any("possible leakage" in warning for warning in summary["warnings"])


def test_a_test_folder_that_copies_the_data_is_refused(invoke, folder_data, tmp_path):
    test_root = tmp_path / "held_out"
    shutil.copytree(folder_data / "crack", test_root / "crack")  # every test image duplicates a train/val one
    shutil.copytree(folder_data / "normal", test_root / "normal")
    run = tmp_path / "run"
    code, _, err = invoke("inspect", "--data", folder_data, "--rare", "crack", "--test-data", test_root, "--run", run)
    assert code == 2 and "100% of its images duplicate" in err and str(test_root) in err
    assert len(err.strip().splitlines()) == 1 and not (run / "split.csv").exists()


def test_split_csv_columns_and_data_json_hold_no_paths(invoke, folder_data, tmp_path):
    run = tmp_path / "run"
    assert invoke("inspect", "--data", folder_data, "--rare", "crack", "--run", run)[0] == 0
    with open(run / "split.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["id", "root", "path", "mask", "class", "rare", "split", "fold", "group"]
    for name in ("data.json", "stages/split.yaml"):
        text = (run / name).read_text()
        assert str(folder_data) not in text and "crack 1" not in text and ".png" not in text


@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_bad_fractions_are_one_line_errors(invoke, folder_data, fraction):
    code, _, err = invoke("inspect", "--data", folder_data, "--rare", "crack", "--test-fraction", fraction)
    assert code == 2 and "--test-fraction" in err and len(err.strip().splitlines()) == 1


def test_a_layouts_fixed_train_images_never_go_to_test(tmp_path):
    """Groups the layout fixes (MVTec train/good) sort before the free ones here: indices must not mix."""
    from pathlib import Path

    from data_adapters import Record

    root = Path(tmp_path)
    records = [Record(root / f"a_good/{i}.png", root, "good", fixed_split="trainval", cls="good") for i in range(10)]
    records += [Record(root / f"b_test_good/{i}.png", root, "good", fixed_split="test", cls="good") for i in range(4)]
    records += [Record(root / f"c_defect/{i}.png", root, "defect", cls="defect", is_rare=True) for i in range(10)]
    config = build_config(None, {"data.rare": "defect"})
    rows = {row.path: row for row in make_split(records, [], config)}
    assert all(rows[f"a_good/{i}.png"].split in ("train", "val") for i in range(10))
    assert all(rows[f"b_test_good/{i}.png"].split == "test" for i in range(4))
    assert sum(rows[f"c_defect/{i}.png"].split == "test" for i in range(10)) == 2


def test_a_patient_in_the_test_folder_takes_their_main_images_to_test(tmp_path):
    from pathlib import Path

    from data_adapters import Record

    root = Path(tmp_path)
    main = [Record(root / f"m/{i}.png", root, "x", patient=f"p{i % 6}", cls="x", is_rare=i % 2 == 0) for i in range(24)]
    held = [Record(root / f"t/{i}.png", root, "x", patient="p3", cls="x") for i in range(2)]
    rows = make_split(main, held, build_config(None, {}))
    by_group = {}
    for row in rows:
        by_group.setdefault(row.group, set()).add(row.split)
    assert all(len(splits) == 1 for splits in by_group.values())


def test_rare_images_of_few_patients_still_reach_val_and_test(tmp_path):
    """Three rare patients: one each for test, val and train, rather than none in val or test."""
    from pathlib import Path

    from data_adapters import Record

    root = Path(tmp_path)
    records = [Record(root / f"r/{i}.png", root, "x", patient=f"p{i % 3}", cls="x", is_rare=True) for i in range(9)]
    records += [Record(root / f"n/{i}.png", root, "n", patient=f"q{i}", cls="n") for i in range(20)]
    rows = make_split(records, [], build_config(None, {}))
    splits = {row.split for row in rows if row.rare}
    assert splits == {"train", "val", "test"}


def test_fold_view_is_the_one_leakage_rule():
    """Each fold validates on its own non-test images and trains on every other non-test image; without folds
    the split column decides; test images are nobody's training or validation data; a wrong --fold is one line."""
    from rareaug.errors import RareaugError
    from rareaug.split import SplitRow, chosen_fold, fold_view, lora_images, seen_rows, split_folds

    def row(i: int, rare: bool, split: str, fold: int) -> SplitRow:
        return SplitRow(f"{'r' if rare else 'n'}{i}", "/d", f"{i}.png", "", "c" if rare else "n", rare, split, fold, "")

    folded = [row(i, i % 2 == 0, "test" if i >= 12 else "train", i % 3) for i in range(16)]
    assert split_folds(folded) == 3 and len(seen_rows(folded)) == 12
    validated = []
    for fold in range(3):
        view = fold_view(folded, 3, fold)
        assert {r.fold for r in view.validate} == {fold} and fold not in {r.fold for r in view.train}
        assert len(view.train) + len(view.validate) == 12 and all(r.split == "test" for r in view.test)
        assert view.rare_train == [r for r in view.train if r.rare]
        validated += view.validate
    assert sorted(r.id for r in validated) == sorted(r.id for r in seen_rows(folded))  # each image validates once
    assert lora_images(folded, 3) == [r for r in seen_rows(folded) if r.rare]

    plain = [row(i, i % 2 == 0, ("train", "val", "test")[i % 3], 0) for i in range(9)]
    view = fold_view(plain, 1)
    assert [r.split for r in view.train + view.validate + view.test] == ["train"] * 3 + ["val"] * 3 + ["test"] * 3
    assert lora_images(plain, 1) == [r for r in plain if r.rare and r.split == "train"]
    assert chosen_fold(3, 2) == 2 and chosen_fold(1, None) == 0
    for check, words in ((lambda: chosen_fold(3, None), "pass --fold"),
                         (lambda: fold_view(folded, 3, 3), "out of range"),
                         (lambda: chosen_fold(1, 0), "no folds")):
        with pytest.raises(RareaugError, match=words):
            check()

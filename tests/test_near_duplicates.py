"""Near-duplicates across splits: distinct real garments are never flagged, while copies of one (exact, JPEG
re-encoded, brightened) placed in another split are, in one grouped warning, with every pair in data.json."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from rareaug.near_duplicates import NearDuplicates
from rareaug.samples import fashion_root


@pytest.fixture
def garments(tmp_path):
    """Real Fashion-MNIST images from the shipped sample: the first 30 of four classes, in a folder of its own."""
    root = tmp_path / "garments"
    for cls in ("pullover", "coat", "shirt", "t-shirt"):
        files = sorted((fashion_root() / cls).glob("*.png"))
        (root / cls).mkdir(parents=True)
        for path in files[:30]:
            shutil.copy(path, root / cls / path.name)
    return root


def test_distinct_real_garments_raise_no_leakage_warning(invoke, tmp_path):
    """The whole shipped Fashion-MNIST sample (what `make demo` inspects): 28-px garments that share outlines."""
    run = tmp_path / "run"
    code, out, err = invoke("inspect", "--data", fashion_root(), "--rare", "pullover", "--run", run)
    assert code == 0, err
    assert "leakage" not in out + err
    saved = json.loads((run / "data.json").read_text())
    assert saved["leaks"] == [] and 0 < saved["near_duplicate_rule"]["threshold"] < 0.01


def _plant(source, target, how):
    image = Image.open(source).convert("L")
    if how == "jpeg":
        image.save(target.with_suffix(".jpg"), "JPEG", quality=75)
        return
    if how == "brighter":
        image = ImageEnhance.Brightness(image).enhance(1.1)
    image.save(target)


def test_planted_copies_across_splits_are_warned_once_and_listed(invoke, garments, tmp_path):
    held_out = tmp_path / "held_out"
    for cls in ("pullover", "coat"):
        (held_out / cls).mkdir(parents=True)
    for cls in ("pullover", "coat"):  # images the data folder does not hold
        for path in sorted((fashion_root() / cls).glob("*.png"))[30:]:
            shutil.copy(path, held_out / cls / path.name)
    pullovers = sorted((garments / "pullover").glob("*.png"))
    planted = {"exact": pullovers[0], "jpeg": pullovers[1], "brighter": pullovers[2]}
    for how, source in planted.items():
        _plant(source, held_out / "pullover" / f"{how}.png", how)
    run = tmp_path / "run"
    code, out, err = invoke("inspect", "--data", garments, "--rare", "pullover", "--test-data", held_out,
                            "--run", run)
    assert code == 0, err  # a few leaks are a warning, not a refusal
    warnings = [line for line in (out + err).splitlines() if "possible leakage" in line]
    assert len(warnings) == 1 and "3 near-duplicate pair(s)" in warnings[0]
    saved = json.loads((run / "data.json").read_text())
    split = {row.split(",")[0]: row.split(",") for row in (run / "split.csv").read_text().splitlines()[1:]}
    paths = {row[0]: row[2] for row in split.values()}
    found = {frozenset((paths[leak["a"]].split("/")[-1], paths[leak["b"]].split("/")[-1])) for leak in saved["leaks"]}
    assert found == {frozenset((source.name, f"{how}.{'jpg' if how == 'jpeg' else 'png'}"))
                     for how, source in planted.items()}
    assert all("test" in (leak["a_split"], leak["b_split"]) for leak in saved["leaks"])


def test_the_rule_ignores_blank_images_and_pairs_within_a_group():
    rng = np.random.default_rng(0)
    textured = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(20)]
    blank = np.full((16, 16), 7, np.uint8)
    thumbs = textured + [textured[3].copy(), blank, blank.copy()]
    index = NearDuplicates(thumbs)
    groups = ["train"] * 20 + ["test", "train", "test"]
    assert [(p.a, p.b) for p in index.pairs(groups)] == [(3, 20)]
    assert index.pairs(["train"] * len(thumbs)) == []  # the same split: not a leak
    # comparing only some images with all (very large data sets) finds the same pairs among them
    assert [(p.a, p.b) for p in index.pairs(groups, probes=[20])] == [(20, 3)]
    assert index.copied([20, 21], list(range(20))).tolist() == [True, False]


def test_nearly_alike_data_gets_a_threshold_under_its_typical_pair():
    from data_adapters.thumbnail import thumbnail_of

    rng = np.random.default_rng(1)
    scene = np.kron(rng.random((8, 8)), np.ones((8, 8)))  # one aligned object, photographed 60 times with noise
    alike = [thumbnail_of(np.clip(scene + 0.01 * rng.standard_normal(scene.shape), 0, 1)) for _ in range(60)]
    index = NearDuplicates(alike)
    assert index.threshold < index.typical and index.pairs(rng.integers(0, 3, 60)) == []

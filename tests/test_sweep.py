"""`rareaug sweep-ratio` on tiny models: the grid, shared baselines, nested pools, resume, no test peeking."""
from __future__ import annotations

import csv
import json
import random
import shutil

import numpy as np
import pytest

import rareaug.sweep.stage as stage
from rareaug.errors import RareaugError
from rareaug.run_dir import RunDir
from rareaug.sweep import metrics as M

GRID = ("--model", "tiny-resnet18", "--seeds", "1", "--steps", "4", "--batch-size", "8", "--no-pretrained",
        "--generate-steps", "2", "--guard-threshold", "0.01")
# The tiny model's blobs are far from any real image; a low guard threshold keeps generation quick.


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """fit -> sweep-ratio (which generates its pools on demand) on a small real-image folder."""
    from conftest import fitted_run
    from typer.testing import CliRunner

    from rareaug.cli import app

    run = fitted_run(tmp_path_factory, n_rare=10, n_normal=20, fit_steps=2)
    result = CliRunner().invoke(app, ["sweep-ratio", "--run", str(run), "--ratios", "0,1,2", "--methods",
                                      "loft,classic", *GRID])
    assert result.exit_code == 0, result.stderr
    return run


def metrics(run):
    with open(run / "sweep" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_outputs_exist_with_their_columns(swept):
    rows = metrics(swept)
    assert {"method", "model", "ratio", "seed", "fold", "n_real_rare", "n_synth", "pos_weight_rule", "threshold",
            "recall", "precision", "f1", "pr_auc", "auroc", "sens_at_95spec", "f1_ci_low", "f1_ci_high", "diversity",
            "diversity_metric"} <= set(rows[0])
    for row in rows:
        predictions = swept / "sweep" / "predictions" / f"{row['cell']}.csv"
        with open(predictions, newline="") as handle:
            assert next(csv.reader(handle)) == ["id", "split", "label", "score"]
    summary = json.loads((swept / "sweep" / "summary.json").read_text())
    assert set(summary["models"]["tiny-resnet18"]) == {"loft", "classic"}
    assert "recommended_ratio" in summary["models"]["tiny-resnet18"]["loft"]
    assert "Ratio sweep" in (swept / "sweep" / "summary.md").read_text()


def test_ratio_0_models_score_each_pool_for_the_users_fidelity_estimate(swept):
    """The ratio-0 model never trains on a pool's images; it scores the first ones, and the summary gives the
    share it calls rare at its own validation threshold."""
    baseline = next(r for r in metrics(swept) if float(r["ratio"]) == 0)
    with open(swept / "sweep" / "predictions" / f"{baseline['cell']}.csv", newline="") as handle:
        pool_rows = [r for r in csv.DictReader(handle) if r["split"] == "pool"]
    variants = {r["id"].rsplit(":", 1)[0] for r in pool_rows}
    assert len(variants) == 2 and any(v.startswith("loft-") for v in variants) and "classic" in variants
    estimates = json.loads((swept / "sweep" / "summary.json").read_text())["pool_estimates"]["tiny-resnet18"]
    for variant in variants:
        scores = [float(r["score"]) for r in pool_rows if r["id"].startswith(variant + ":")]
        expected = sum(score >= float(baseline["threshold"]) for score in scores) / len(scores)
        assert estimates[variant]["judged_rare"] == pytest.approx(expected)
        assert estimates[variant]["images"] == len(scores) and estimates[variant]["cells"] == 1
    assert "an estimate" in (swept / "sweep" / "summary.md").read_text()


def test_ratio_0_is_one_shared_baseline_without_synthetic_images(swept):
    rows = metrics(swept)
    baseline = [r for r in rows if float(r["ratio"]) == 0]
    assert len(baseline) == 1 and baseline[0]["method"] == "none" and baseline[0]["n_synth"] == "0"
    n_real = int(baseline[0]["n_real_rare"])
    for row in rows:
        assert int(row["n_synth"]) == round(float(row["ratio"]) * n_real)
        if float(row["ratio"]) > 0:
            assert row["diversity_metric"] in ("lpips_alex", "1-ms_ssim")


def test_pools_nest_and_come_from_train_loras_only(swept):
    split = list(csv.DictReader(open(swept / "split.csv", newline="")))
    train_rare = {r["id"] for r in split if r["rare"] == "1" and r["split"] == "train"}
    manifest = list(csv.DictReader(open(next((swept / "synthetic").glob("loft-*")) / "manifest.csv", newline="")))
    for row in manifest:
        assert set(row["loras"].split(";")) <= train_rare
    one = {r["id"] for r in csv.DictReader(open(swept / "sweep" / "predictions" / "loft-r1-tiny-resnet18-s0-f0.csv"))}
    assert one  # predictions exist; nesting itself is checked on the cell inputs below
    from rareaug.sweep.data import Example

    pool = [Example(f"s{i}", 1, swept) for i in range(40)]
    rows = [type("Row", (), {"rare": True, "split": "train", "fold": 0})() for _ in range(6)]
    first = stage._prefix({("loft", 0): pool}, stage.Cell("loft", "m", 1.0, 0, 0), rows, 1)
    second = stage._prefix({("loft", 0): pool}, stage.Cell("loft", "m", 2.0, 0, 0), rows, 1)
    assert len(first) == 6 and second[:6] == first


def test_finished_cells_are_skipped_on_rerun(swept, tmp_path, invoke, monkeypatch):
    run = shutil.copytree(swept, tmp_path / "run")
    monkeypatch.setattr(stage, "run_cell", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-trained")))
    code, _, err = invoke("sweep-ratio", "--run", run, "--ratios", "0,1,2", "--methods", "loft,classic", *GRID)
    assert code == 0, err
    assert len(metrics(run)) == len(metrics(swept))


def test_one_failing_cell_keeps_the_others(swept, tmp_path, invoke, monkeypatch):
    run = shutil.copytree(swept, tmp_path / "run")
    for marker in (run / "sweep" / "cells").glob("*.json"):
        marker.unlink()
    original = stage.run_cell

    def flaky(cell, *args, **kwargs):
        if cell.ratio == 2 and cell.method == "classic":
            raise RuntimeError("simulated failure")
        return original(cell, *args, **kwargs)

    monkeypatch.setattr(stage, "run_cell", flaky)
    code, _, err = invoke("sweep-ratio", "--run", run, "--ratios", "0,1,2", "--methods", "loft,classic", *GRID)
    assert code == 2 and "1 cell(s) failed" in err
    assert len(metrics(run)) == len(metrics(swept)) - 1
    assert (json.loads((run / "sweep" / "summary.json").read_text())["failed_cells"]
            == ["classic-r2-tiny-resnet18-s0-f0"])


def test_recommendation_never_sees_test_labels(swept, tmp_path):
    """Shuffling every test label leaves the thresholds and the recommended ratios unchanged."""
    from rareaug.config import build_config

    run = shutil.copytree(swept, tmp_path / "run")
    config = build_config(None, {"run": str(run), "sweep.bootstrap": 50})
    rows = [dict(r, ratio=float(r["ratio"]), seed=int(r["seed"]), fold=int(r["fold"]), threshold=float(r["threshold"]),
                 **{k: float(r[k]) for k in ("f1", "recall", "precision", "pr_auc", "auroc", "sens_at_95spec")},
                 n_synth=int(r["n_synth"])) for r in metrics(run)]
    before = stage.summarise(rows, RunDir(run), config, [])
    rng = random.Random(0)
    for path in (run / "sweep" / "predictions").glob("*.csv"):
        lines = list(csv.DictReader(open(path, newline="")))
        test_labels = [r["label"] for r in lines if r["split"] == "test"]
        rng.shuffle(test_labels)
        shuffled = iter(test_labels)
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "split", "label", "score"])
            writer.writeheader()
            for r in lines:
                writer.writerow(dict(r, label=next(shuffled) if r["split"] == "test" else r["label"]))
    after = stage.summarise(rows, RunDir(run), config, [])
    for method in before["models"]["tiny-resnet18"]:
        b, a = before["models"]["tiny-resnet18"][method], after["models"]["tiny-resnet18"][method]
        assert a["recommended_ratio"] == b["recommended_ratio"]
        assert [r["val_f1"] for r in a["ratios"].values()] == [r["val_f1"] for r in b["ratios"].values()]


def test_bad_grid_options_are_one_line_errors(swept, invoke):
    code, _, err = invoke("sweep-ratio", "--run", swept, "--model", "vgg", *GRID[2:])  # the grid minus its model
    assert code == 2 and "vgg" in err and len(err.strip().splitlines()) == 1
    code, _, err = invoke("sweep-ratio", "--run", swept, "--ratios", "a,b", *GRID)
    assert code == 2 and "--ratios" in err
    code, _, err = invoke("sweep-ratio", "--run", swept, "--pos-weight", "x", *GRID)
    assert code == 2 and "--pos-weight" in err


def test_folds_validate_on_their_own_images_and_fuse_only_the_others(invoke, tmp_path):
    """Every stage's use of the fold rule (`split.fold_view`): fit's class LoRAs, generate's fused pairs, the
    sweep's train / validate / test images and real-image counts, and export's training set."""
    from conftest import write_image

    from rareaug.split import fold_view, read_split

    root = tmp_path / "data"
    for i in range(12):
        write_image(root / "crack" / f"c{i}.png")
    for i in range(18):
        write_image(root / "normal" / f"n{i}.png")
    run = tmp_path / "run"
    code, _, err = invoke("fit", "--data", root, "--rare", "crack", "--run", run, "--folds", "3", "--base-model",
                          "tiny", "--resolution", "64", "--steps", "2")
    assert code == 0, err
    code, _, err = invoke("sweep-ratio", "--run", run, "--ratios", "0,1", *GRID)
    assert code == 0, err
    rows = metrics(run)
    assert sorted({int(r["fold"]) for r in rows}) == [0, 1, 2] and len(rows) == 6
    split = read_split(run / "split.csv")
    fold_of = {r.id: r.fold for r in split}
    views = [fold_view(split, 3, fold) for fold in range(3)]
    for fold, view in enumerate(views):
        ids = {part: {r.id for r in getattr(view, part)} for part in ("train", "validate", "test", "rare_train")}
        assert ids["validate"] and not ids["train"] & ids["validate"]
        assert not (ids["train"] | ids["validate"]) & ids["test"]
        manifest = list(csv.DictReader(open(run / "synthetic" / f"loft-l0.5-g2-s2-f{fold}" / "manifest.csv",
                                            newline="")))
        assert manifest and all(lora in ids["rare_train"] for r in manifest for lora in r["loras"].split(";"))
        with open(run / "sweep" / "predictions" / f"loft-r1-tiny-resnet18-s0-f{fold}.csv", newline="") as handle:
            predicted = list(csv.DictReader(handle))
        assert {r["id"] for r in predicted if r["split"] == "val"} == ids["validate"]
        assert {r["id"] for r in predicted if r["split"] == "test"} == ids["test"]
        cell = next(r for r in rows if r["cell"] == f"loft-r1-tiny-resnet18-s0-f{fold}")
        assert int(cell["n_real_rare"]) == len(ids["rare_train"]) == int(cell["n_synth"])
        out = tmp_path / f"export-f{fold}"
        code, _, err = invoke("export", "--run", run, "--out", out, "--ratio", "1", "--fold", str(fold))
        assert code == 0, err
        exported = list(csv.DictReader(open(out / "manifest.csv", newline="")))
        assert sum(r["source"] == "real" for r in exported) == len(ids["train"])
    # Class-level LoRAs are fitted once per fold, each without that fold's images (DataDream's images, Chimera's heads).
    from rareaug.lora.files import read_safetensors

    for method, key in (("datadream", "images"), ("chimera", "heads")):
        code, _, err = invoke("fit", "--run", run, "--method", method, "--steps", "2", "--batch-size", "4")
        assert code == 0, err
        for fold in range(3):
            _, metadata = read_safetensors(run / "loras" / method / f"crack-f{fold}.safetensors")
            used = json.loads(metadata[key])
            assert used and set(used) == {r.id for r in views[fold].rare_train}
            assert all(fold_of[i] != fold for i in used)
    code, _, err = invoke("sweep-ratio", "--run", run, "--ratios", "0,1", "--methods", "datadream", *GRID)
    assert code == 0, err
    assert {int(r["fold"]) for r in metrics(run) if r["method"] == "datadream"} == {0, 1, 2}


def test_multiclass_task_scores_the_rare_class(swept, tmp_path, invoke):
    run = shutil.copytree(swept, tmp_path / "run")
    code, _, err = invoke("sweep-ratio", "--run", run, "--ratios", "0,1", "--task", "multiclass", *GRID)
    assert code == 0, err
    rows = [r for r in metrics(run) if r["task"] == "multiclass"]
    assert len(rows) == 2 and all(r["cell"].endswith("-multiclass") for r in rows)
    with open(run / "sweep" / "predictions" / f"{rows[0]['cell']}.csv", newline="") as handle:
        scores = [float(r["score"]) for r in csv.DictReader(handle)]
    assert scores and all(0.0 <= s <= 1.0 for s in scores)


def test_a_cells_threshold_never_sees_test_labels(swept, tmp_path):
    """The same cell trained twice, once with its test labels shuffled: same threshold, same val metrics."""
    import torch

    from rareaug.config import build_config
    from rareaug.run_dir import frozen_split
    from rareaug.sweep.data import cell_data

    swept = shutil.copytree(swept, tmp_path / "run")  # run_cell writes predictions: keep the shared run intact
    config = build_config(None, {"run": str(swept), "sweep.steps": 4, "sweep.batch_size": 8,
                                 "sweep.pretrained": False, "sweep.bootstrap": 20})
    rows, config, _ = frozen_split(config, set())
    cell = stage.Cell("none", "tiny-resnet18", 0.0, 0, 0)
    data = cell_data(rows, 1, 0, [])
    first = stage.run_cell(cell, data, config, {}, torch.device("cpu"), RunDir(swept))
    labels = [e.label for e in data.test]
    random.Random(1).shuffle(labels)
    for example, label in zip(data.test, labels):
        example.label = label
    second = stage.run_cell(cell, data, config, {}, torch.device("cpu"), RunDir(swept))
    assert first["threshold"] == second["threshold"] and first["val_f1"] == second["val_f1"]


def test_a_class_seen_only_in_test_does_not_shape_the_model():
    from types import SimpleNamespace

    from rareaug.sweep.data import class_names, real_example

    rows = [SimpleNamespace(cls="crack", rare=True, split="train"),
            SimpleNamespace(cls="normal", rare=False, split="val"),
            SimpleNamespace(cls="aaa", rare=False, split="test")]
    assert class_names(rows) == ["crack", "normal"]
    row = SimpleNamespace(cls="aaa", rare=False, id="n1", abs_path=None, abs_mask=None, group="", split="test")
    assert real_example(row, class_names(rows)).target == -1


def test_a_changed_synthetic_image_retrains_the_cells_that_use_it(swept, tmp_path, invoke, monkeypatch):
    from conftest import write_image

    run = shutil.copytree(swept, tmp_path / "run")
    pool = next((run / "synthetic").glob("loft-*"))
    first = sorted(pool.glob("s*.png"))[0]
    write_image(first, size=64)  # same name, other pixels: as if the pool had been regenerated
    retrained = []
    original = stage.run_cell
    monkeypatch.setattr(stage, "run_cell", lambda cell, *a, **k: retrained.append(cell.name) or original(cell, *a, **k))
    code, _, err = invoke("sweep-ratio", "--run", run, "--ratios", "0,1,2", "--methods", "loft,classic", *GRID)
    assert code == 0, err
    # The loft cells train on it and the ratio-0 cell scores it for the pool estimate; classic cells never see it.
    assert any(name.startswith("loft-") for name in retrained)
    assert all(name.startswith(("loft-", "none-")) for name in retrained)


def test_input_size_below_16_is_refused_in_one_line():
    from rareaug.config import build_config

    with pytest.raises(RareaugError, match="--input-size must be at least 16"):
        build_config("natural", {"sweep.input_size": 8})
    assert build_config("fashion_mnist").sweep.input_size == 32


# --- the verdict counts training noise -----------------------------------------------------------------------

def _cells_on_disk(run, method: str, ratio: float, decisions_by_seed: dict[int, np.ndarray], labels: np.ndarray):
    """Prediction files as run_cell writes them: a validation set that puts every seed's threshold between 0.1
    and 0.9, and test scores of 0.95 (called rare) or 0.05."""
    run.sweep_predictions_folder.mkdir(parents=True, exist_ok=True)
    cells = []
    for seed, decisions in decisions_by_seed.items():
        name = f"{method}-r{ratio:g}-m-s{seed}-f0"
        lines = ["id,split,label,score", "v0,val,1,0.9", "v1,val,0,0.1"]
        lines += [f"t{i:03d},test,{int(label)},{0.95 if decided else 0.05}"
                  for i, (label, decided) in enumerate(zip(labels, decisions))]
        run.sweep_predictions(name).write_text("\n".join(lines) + "\n")
        cells.append({"cell": name, "method": method, "ratio": ratio, "seed": seed, "fold": 0})
    return cells


def _noisy_runs(n_seeds: int, n_images: int = 300):
    """Ratio 0: every seed right on a random 70% of the test images. The chosen ratio: seed 0 right on every image,
    the other seeds exactly as at ratio 0. One lucky seed, no change in the others."""
    rng = np.random.default_rng(5)
    labels = np.arange(n_images) % 3 == 0
    before = {seed: np.where(rng.random(n_images) < 0.7, labels, ~labels) for seed in range(n_seeds)}
    after = {seed: labels.copy() if seed == 0 else before[seed] for seed in range(n_seeds)}
    return labels, before, after


def test_a_gain_one_lucky_seed_makes_is_not_distinguishable_from_noise(tmp_path):
    from rareaug.config import Config

    labels, before, after = _noisy_runs(3)
    baseline = _cells_on_disk(RunDir(tmp_path), "none", 0.0, before, labels)
    chosen = _cells_on_disk(RunDir(tmp_path), "loft", 2.0, after, labels)
    sw = Config().sweep
    # Test images alone would call the gain real: every image resample keeps the lucky seed's improvement.
    b, a = np.stack(list(before.values())), np.stack(list(after.values()))
    image_only = [M.mean_f1(a[:, i], labels[i]) - M.mean_f1(b[:, i], labels[i])
                  for i in M.resample_indices(None, len(labels), 300, 0)]
    assert np.percentile(image_only, 2.5) > 0
    gain = stage._gain(chosen + baseline, baseline, "loft", 2.0, RunDir(tmp_path), sw, {})
    assert gain["diff"] > 0.05 and gain["low"] <= 0 < gain["high"]
    assert gain["verdict"] == "not distinguishable from noise" and gain["distinguishable"] is False
    assert gain["interval_kind"] == "seeds x folds x test images" and gain["runs"] == 3


def test_every_seed_gaining_is_distinguishable_and_two_runs_are_too_few(tmp_path):
    from rareaug.config import Config

    labels, before, _ = _noisy_runs(3)
    better = {seed: np.where(np.arange(len(labels)) % 2 == 0, labels, d) for seed, d in before.items()}
    baseline = _cells_on_disk(RunDir(tmp_path), "none", 0.0, before, labels)
    chosen = _cells_on_disk(RunDir(tmp_path), "loft", 2.0, better, labels)
    gain = stage._gain(chosen + baseline, baseline, "loft", 2.0, RunDir(tmp_path), Config().sweep, {})
    assert gain["low"] > 0 and gain["verdict"] == "a gain beyond noise"
    two = stage._gain(chosen[:2] + baseline[:2], baseline[:2], "loft", 2.0, RunDir(tmp_path), Config().sweep, {})
    assert two["runs"] == 2 and two["verdict"] == "too few runs to judge" and two["distinguishable"] is False


def test_a_sweep_trained_in_groups_gives_the_results_of_one_cell_at_a_time(swept, tmp_path, invoke):
    """--group-cells trains the pending cells of one model as one stacked model; the figures do not change."""
    run = shutil.copytree(swept, tmp_path / "run")
    for marker in (run / "sweep" / "cells").glob("*.json"):
        marker.unlink()
    code, _, err = invoke("sweep-ratio", "--run", run, "--ratios", "0,1,2", "--methods", "loft,classic", *GRID,
                          "--group-cells", "5")
    assert code == 0, err
    alone = {row["cell"]: row for row in metrics(swept)}
    grouped = {row["cell"]: row for row in metrics(run)}
    assert grouped.keys() == alone.keys() and len(grouped) == 5
    for name, row in grouped.items():
        for key in ("pr_auc", "auroc", "best_step", "n_synth"):
            assert float(row[key]) == pytest.approx(float(alone[name][key]), abs=1e-3), (name, key)

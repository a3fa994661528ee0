"""`rareaug generate` on the tiny model: diffusers equivalence, plans, nested pools, resume, the guard."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import pool_manifest
from PIL import Image

import rareaug.generate.stage as stage
from rareaug.generate import plans
from rareaug.lora.bank import LoRABank
from rareaug.lora.files import bank_from_lora_files, to_diffusers_state
from rareaug.models import load_base_model
from rareaug.split import fold_view

FAST = ("--steps", "3", "--batch-size", "3", "--guard-threshold", "0.01")


@pytest.fixture
def fitted(fitted_loft):
    return fitted_loft


@pytest.fixture
def run(loft_run):
    return loft_run


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


# --- plans -----------------------------------------------------------------------------------------

def test_loft_pairs_use_every_ordered_pair_once_then_reshuffle():
    ids = [f"r{i}" for i in range(5)]
    plan = plans.LoftPairs(ids, seed=3)
    first = [plan(slot).loras for slot in range(20)]
    assert len(set(first)) == 20 and all(a != b for a, b in first)
    second = [plan(slot).loras for slot in range(20, 40)]
    assert set(second) == set(first) and second != first
    assert all(plan(slot).weights == (0.5, 0.5) for slot in range(40))
    single = plans.LoftPairs(ids, seed=3, lam=1.0)
    assert sorted(single(slot).loras for slot in range(5)) == [(i,) for i in ids]


def test_lambda_and_dirichlet_weights_follow_their_distributions():
    plan = plans.LoftPairs([f"r{i}" for i in range(6)], seed=0, beta_alpha=10.0)
    lambdas = np.array([plan(slot).weights[0] for slot in range(4000)])
    assert abs(lambdas.mean() - 0.5) < 0.01
    assert abs(lambdas.var() - 1 / (4 * 21)) < 0.0015  # Beta(10, 10): variance 1/84
    chimera = plans.ChimeraMix([f"r{i}" for i in range(6)], seed=0, k=4, alpha=1.0)
    weights = np.array([chimera(slot).weights for slot in range(4000)])
    assert np.allclose(weights.sum(axis=1), 1.0)
    assert np.allclose(weights.mean(axis=0), 0.25, atol=0.01)
    assert abs(weights[:, 0].var() - 3 / 80) < 0.004  # Dirichlet(1,1,1,1): var (1*3)/(16*5)
    assert all(len(set(chimera(slot).loras)) == 4 for slot in range(50))


def test_plans_are_pure_functions_of_the_slot():
    plan = plans.LoftPairs([f"r{i}" for i in range(4)], seed=1, beta_alpha=2.0)
    assert [plan(s) for s in range(30)] == [plan(s) for s in range(30)]
    assert plans.image_seed(0, 5, 0) != plans.image_seed(0, 5, 1) != plans.image_seed(1, 5, 0)


# --- equivalence with diffusers --------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["default", "ddim"])
def test_batched_fused_image_equals_diffusers_set_adapters(tmp_path, scheduler):
    from safetensors.torch import save_file

    from rareaug.generate.sampler import BankSampler, SampleRequest, make_scheduler

    base = load_base_model("tiny")
    scratch = LoRABank(copy.deepcopy(base.unet), n_a=2, rank=2, alpha=2.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in scratch.layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.5)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
    paths = []
    for slot, name in enumerate("ab"):
        paths.append(tmp_path / f"{name}.safetensors")
        save_file(to_diffusers_state(scratch.get_slot(slot), 1.0), paths[-1])

    pipe = base.pipeline()
    pipe.scheduler = make_scheduler(scheduler, base.scheduler.config, base.sampling_scheduler)
    pipe.unet = copy.deepcopy(base.unet)
    pipe.load_lora_weights(paths[0], adapter_name="a")
    pipe.load_lora_weights(paths[1], adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.3, 0.7])
    expected = pipe("a photo of a crack", height=64, width=64, num_inference_steps=4, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(1234), output_type="pt").images

    bank = bank_from_lora_files(base.unet, paths)
    sampler = BankSampler(base, bank, "a photo of a crack", 2.0, 4, scheduler, torch.device("cpu"), 64)
    # The same image, batched with two others that carry other mixes.
    ours = sampler.sample([SampleRequest([1], [1], [1.0], 7), SampleRequest([0, 1], [0, 1], [0.3, 0.7], 1234),
                           SampleRequest([0, 1], [0, 1], [0.9, 0.1], 99)])
    assert torch.allclose(ours[1], expected[0], atol=2e-4), (ours[1] - expected[0]).abs().max()
    assert not torch.allclose(ours[0], ours[1], atol=1e-2)


# --- the pool ---------------------------------------------------------------------------------------

def test_generate_ratio_makes_images_and_manifest(invoke, run):
    code, out, err = invoke("generate", "--run", run, "--ratio", "2", *FAST)
    assert code == 0, err
    folder = run / "synthetic" / "loft-l0.5-g2-s3"
    rows = pool_manifest(folder)
    n_train = len([line for line in (run / "split.csv").read_text().splitlines() if ",1,train," in line])
    kept = [r for r in rows if r["kept"] == "1"]
    assert len(kept) == 2 * n_train
    assert set(rows[0]) >= {"file", "pool_index", "class", "method", "loras", "weights", "seed", "attempt", "guidance",
                            "steps", "scheduler", "prompt", "base_model", "base_model_hash", "rareaug_version",
                            "nearest_real_id", "nearest_real_distance", "kept", "reject_reason"}
    for row in kept:
        a, b = row["loras"].split(";")
        assert a != b and a.startswith("r") and b.startswith("r") and row["weights"] == "0.5;0.5"
        image = Image.open(folder / row["file"])
        assert image.mode == "L" and image.size == (64, 64)  # grayscale sources stay grayscale
        assert image.text["rareaug:synthetic"] == "true" and image.text["rareaug:variant"] == "loft-l0.5-g2-s3"
    assert (run / "stages" / "generate-loft-l0.5-g2-s3.yaml").exists()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["base_model_revision"] == "" and summary["base_model_hash"] == rows[0]["base_model_hash"]


def test_pools_nest_and_extend(invoke, run, fitted, tmp_path):
    other = shutil.copytree(fitted, tmp_path / "other")
    assert invoke("generate", "--run", run, "--n", "4", *FAST)[0] == 0
    assert invoke("generate", "--run", run, "--n", "8", *FAST)[0] == 0  # extends the same pool
    assert invoke("generate", "--run", other, "--n", "8", *FAST)[0] == 0  # made in one go
    small = pool_manifest(run / "synthetic" / "loft-l0.5-g2-s3")
    big = pool_manifest(other / "synthetic" / "loft-l0.5-g2-s3")
    assert [r["pool_index"] for r in small] == [r["pool_index"] for r in big]
    for row in big:
        assert np.abs(pixels(run / "synthetic" / "loft-l0.5-g2-s3" / row["file"])
                      - pixels(other / "synthetic" / "loft-l0.5-g2-s3" / row["file"])).max() <= 1
    code, out, _ = invoke("generate", "--run", run, "--n", "3", *FAST)  # fewer: the first ones are reused
    assert code == 0 and "already holds 8" in out


def test_one_image_regenerates_alone_identically(run, invoke):
    assert invoke("generate", "--run", run, "--n", "6", *FAST)[0] == 0
    folder = run / "synthetic" / "loft-l0.5-g2-s3"
    row = pool_manifest(folder)[4]
    from rareaug.config import build_config
    from rareaug.run_dir import RunDir, frozen_split

    config = build_config(None, {"run": str(run), "generate.steps": 3})
    rows, config, _ = frozen_split(config, set())
    config = stage._with_fit_settings(config, stage._fit_stage(RunDir(run), "loft"))
    maker = stage._ImageMaker(config, RunDir(run), fold_view(rows, 1).rare_train, [], "x", torch.device("cpu"))
    alone = maker.render([(int(row["pool_index"]), int(row["attempt"]))])[0][0]
    saved = pixels(folder / row["file"])
    regenerated = np.round(alone.mean(dim=0).numpy() * 255)
    assert np.abs(regenerated - saved).max() <= 1


def test_resume_after_interruption_has_no_duplicates(invoke, run, fitted, tmp_path, monkeypatch):
    straight = shutil.copytree(fitted, tmp_path / "straight")
    assert invoke("generate", "--run", straight, "--n", "7", *FAST)[0] == 0
    calls = {"n": 0}
    original = stage._ImageMaker.render

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(stage._ImageMaker, "render", interrupted)
    code, _, err = invoke("generate", "--run", run, "--n", "7", *FAST)
    assert code == 130
    monkeypatch.setattr(stage._ImageMaker, "render", original)
    assert invoke("generate", "--run", run, "--n", "7", *FAST)[0] == 0
    rows = pool_manifest(run / "synthetic" / "loft-l0.5-g2-s3")
    indices = [r["pool_index"] for r in rows]
    assert len(indices) == len(set(indices)) == 7
    assert indices == [r["pool_index"] for r in pool_manifest(straight / "synthetic" / "loft-l0.5-g2-s3")]
    assert not list((run / "synthetic" / "loft-l0.5-g2-s3").glob("manifest.part-*"))


def test_guard_rejects_a_planted_copy_and_stops_after_three_attempts(invoke, run, monkeypatch):
    original = stage._ImageMaker.render

    def planted(self, batch):
        images, masks = original(self, batch)
        for k, (slot, _) in enumerate(batch):
            if slot == 1:
                images[k] = self.reals[0]  # an exact copy of a real training image
        return images, masks

    monkeypatch.setattr(stage._ImageMaker, "render", planted)
    code, out, err = invoke("generate", "--run", run, "--n", "4", "--steps", "3", "--batch-size", "2",
                            "--guard-threshold", "0.05")
    assert code == 0, err
    rows = pool_manifest(run / "synthetic" / "loft-l0.5-g2-s3")
    slot1 = next(r for r in rows if r["pool_index"] == "1")
    assert slot1["kept"] == "0" and slot1["attempt"] == "2" and "memorization" in slot1["reject_reason"]
    assert slot1["file"] == "" and float(slot1["nearest_real_distance"]) < 0.05
    assert [r["pool_index"] for r in rows if r["kept"] == "1"] == ["0", "2", "3", "4"]
    summary = (run / "synthetic" / "loft-l0.5-g2-s3" / "summary.json").read_text()
    assert '"rejected_slots": 1' in summary


def test_calibrated_threshold_is_the_fifth_percentile_of_real_nearest_distances():
    from rareaug.generate.guard import Guard

    generator = torch.Generator().manual_seed(0)
    reals = torch.rand(6, 1, 32, 32, generator=generator)
    guard = Guard(torch.cat([reals, reals[:1]]), [f"r{i}" for i in range(7)], rule="absolute")  # r6 duplicates r0
    distances = guard.distances(guard.reals, guard.reals).numpy()
    np.fill_diagonal(distances, np.inf)
    distances[distances < 1e-6] = np.inf
    assert guard.threshold == pytest.approx(np.percentile(distances.min(axis=1), 5))
    judged = guard.judge(reals[2:3])
    assert (judged.nearest_ids == ["r2"] and judged.distances[0] == pytest.approx(0, abs=1e-5)
            and judged.copies == [True])


@pytest.mark.parametrize("method", ["classprompt", "classic"])
def test_baselines(invoke, run, method):
    code, _, err = invoke("generate", "--run", run, "--n", "3", "--method", method, *FAST)
    assert code == 0, err
    folder = next((run / "synthetic").glob(f"{method}*"))
    rows = pool_manifest(folder)
    assert sum(r["kept"] == "1" for r in rows) == 3
    if method == "classic":
        assert all(r["loras"].startswith("r") and r["prompt"] == "" for r in rows)  # the real source's id
    else:
        assert all(r["loras"] == "" for r in rows)


def test_manifest_holds_no_path_or_patient_value(invoke, dicom_data, tmp_path):
    run = tmp_path / "run"
    code, _, err = invoke("fit", "--data", dicom_data, "--rare", "pneumothorax", "--run", run, "--base-model", "tiny",
                          "--resolution", "64", "--steps", "2", "--test-fraction", "0.25", "--val-fraction", "0.25")
    assert code == 0, err
    code, _, err = invoke("generate", "--run", run, "--n", "3", *FAST)
    assert code == 0, err
    for path in (run / "synthetic").rglob("*"):
        if path.suffix in (".csv", ".json"):
            text = path.read_text()
            assert "PID-SECRET" not in text and "Doe" not in text and str(dicom_data) not in text
            assert "img" not in text and "IM" not in text.replace("IMAGE", "")


def test_generate_errors(invoke, run, tmp_path):
    code, _, err = invoke("generate", "--run", run, *FAST)
    assert code == 2 and "--n" in err
    code, _, err = invoke("generate", "--run", run, "--n", "2", "--method", "chimera", *FAST)
    assert code == 2 and "rareaug fit" in err and len(err.strip().splitlines()) == 1
    code, _, err = invoke("generate", "--run", run, "--n", "2", "--scheduler", "nonsense", *FAST)
    assert code == 2 and "--scheduler" in err
    code, _, err = invoke("generate", "--run", run, "--n", "2", "--fold", "1", *FAST)
    assert code == 2 and "--fold" in err


def test_datadream_with_text_encoder_lora_equals_diffusers(invoke, run):
    """DataDream's file (UNet + text-encoder LoRA) through plain diffusers gives the image generate makes."""
    code, _, err = invoke("fit", "--run", run, "--method", "datadream", "--text-encoder-lora", "--steps", "3",
                          "--batch-size", "4", "--lr", "0.05")  # a large step, so the LoRA visibly matters
    assert code == 0, err
    path = run / "loras" / "datadream" / "crack.safetensors"
    from safetensors.torch import load_file

    assert any(key.startswith("text_encoder.") for key in load_file(path))
    from rareaug.config import build_config
    from rareaug.run_dir import RunDir, frozen_split

    config = build_config(None, {"run": str(run), "generate.steps": 3, "generate.method": "datadream"})
    rows, config, _ = frozen_split(config, set())
    config = stage._with_fit_settings(config, stage._fit_stage(RunDir(run), "datadream"))
    maker = stage._ImageMaker(config, RunDir(run), fold_view(rows, 1).rare_train, [], "x", torch.device("cpu"))
    ours = maker.render([(0, 0)])[0][0]

    base = load_base_model("tiny")
    pipe = base.pipeline()
    pipe.load_lora_weights(path)
    expected = pipe(maker.prompt, height=64, width=64, num_inference_steps=3, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(plans.image_seed(0, 0, 0)), output_type="pt").images[0]
    assert torch.allclose(ours, expected, atol=2e-4), (ours - expected).abs().max()
    # The LoRA matters (seen in latents: the tiny random VAE decoder flattens small differences).
    with_lora = pipe(maker.prompt, height=64, width=64, num_inference_steps=3, guidance_scale=2.0,
                     generator=torch.Generator().manual_seed(1), output_type="latent").images
    pipe.unload_lora_weights()
    without = pipe(maker.prompt, height=64, width=64, num_inference_steps=3, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(1), output_type="latent").images
    assert (with_lora - without).abs().max() > 0.05


def test_a_slot_waiting_for_its_retry_when_interrupted_is_filled_first(invoke, run, fitted, tmp_path, monkeypatch):
    """Nesting survives interruptions: the first n kept images never depend on the pool's history."""
    original = stage._ImageMaker.render
    calls = {"n": 0, "stop_at": None}

    def copy_on_first_attempt_of_slot_1(self, batch):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise KeyboardInterrupt
        images, masks = original(self, batch)
        for k, (slot, attempt) in enumerate(batch):
            if slot == 1 and attempt == 0:
                images[k] = self.reals[0]
        return images, masks

    monkeypatch.setattr(stage._ImageMaker, "render", copy_on_first_attempt_of_slot_1)
    args = ("--steps", "3", "--batch-size", "3", "--guard-threshold", "0.05")
    straight = shutil.copytree(fitted, tmp_path / "straight")
    assert invoke("generate", "--run", straight, "--n", "6", *args)[0] == 0
    expected = [r["pool_index"] for r in pool_manifest(straight / "synthetic" / "loft-l0.5-g2-s3") if r["kept"] == "1"]
    assert expected == ["0", "1", "2", "3", "4", "5"]

    calls.update(n=0, stop_at=2)  # stop while slot 1 waits for its second attempt
    assert invoke("generate", "--run", run, "--n", "8", *args)[0] == 130
    calls.update(n=0, stop_at=None)
    assert invoke("generate", "--run", run, "--n", "6", *args)[0] == 0
    kept = [r["pool_index"] for r in pool_manifest(run / "synthetic" / "loft-l0.5-g2-s3") if r["kept"] == "1"]
    assert kept[:6] == expected


def test_a_run_of_rejections_stops_the_pool_with_a_line_and_a_count(invoke, run, monkeypatch):
    """Never fatal: the pool stops short, says why in one line, counts it in summary.json, and a rerun stops at
    the same place instead of burning compute again."""
    import json

    monkeypatch.setattr(stage, "MAX_REJECTED_IN_A_ROW", 3)
    args = ("generate", "--run", run, "--n", "4", "--steps", "3", "--batch-size", "2",
            "--guard-threshold", "2.0")  # 1 - SSIM never reaches 2: everything is "a copy"
    code, out, err = invoke(*args)
    assert code == 0, err
    assert "the guard stopped the pool at 0 of 4 images" in out and "--guard-ratio" in out
    folder = run / "synthetic" / "loft-l0.5-g2-s3"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["stopped_by_guard"] and summary["kept"] == 0 and summary["rejected_slots"] >= 3
    assert summary["guard_rule"] == "absolute" and summary["guard_threshold"] == 2.0
    made = len(pool_manifest(folder))
    code, out, err = invoke(*args)
    assert code == 0 and "stopped the pool" in out and len(pool_manifest(folder)) == made


def test_loras_fitted_on_other_layers_sample_on_those_layers(invoke, folder_data, tmp_path):
    recipe = tmp_path / "qv.yaml"
    recipe.write_text("fit:\n  targets: to_q,to_v\nrecipe:\n  resolution: 64\n")
    run = tmp_path / "run"
    code, _, err = invoke("fit", "--data", folder_data, "--rare", "crack", "--run", run, "--config", recipe,
                          "--base-model", "tiny", "--steps", "2")
    assert code == 0, err
    from safetensors.torch import load_file

    assert all(".to_k." not in key for key in load_file(next((run / "loras" / "loft").glob("*.safetensors"))))
    code, _, err = invoke("generate", "--run", run, "--n", "2", *FAST)
    assert code == 0, err

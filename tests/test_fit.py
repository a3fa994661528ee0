"""`rareaug fit` end to end on the tiny model: files diffusers loads, resume, refusals, bad input."""
from __future__ import annotations

import copy
import csv
import pathlib
import pickle

import pytest
import torch
import yaml
from safetensors.torch import load_file

import rareaug.fit as fit_module
from rareaug.lora.bank import LoRABank
from rareaug.lora.files import from_diffusers_state, read_safetensors

FAST = ("--base-model", "tiny", "--resolution", "64", "--steps", "6")


def fit_args(data, run, *extra):
    return ("fit", "--data", data, "--rare", "crack", "--run", run, *FAST, *extra)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def lora_factors(path) -> dict:
    return {k: v for k, v in load_file(path).items()}


def test_fit_writes_loras_that_plain_diffusers_loads(invoke, folder_data, tmp_path):
    from rareaug.models import build_tiny_components

    run = tmp_path / "run"
    code, out, err = invoke(*fit_args(folder_data, run))
    assert code == 0, err
    loras = run / "loras" / "loft"
    index = read_csv(loras / "index.csv")
    split = read_csv(run / "split.csv")
    train_ids = sorted(r["id"] for r in split if r["rare"] == "1" and r["split"] == "train")
    assert sorted(r["image_id"] for r in index) == train_ids
    assert all(r["steps_done"] == "6" and r["base_model"] == "tiny" and r["method"] == "loft" for r in index)
    losses = read_csv(loras / "losses.csv")
    assert len(losses) == 6 * len(train_ids)
    assert (run / "stages" / "fit-loft.yaml").exists()
    assert not list((loras / "checkpoints").glob("*.ckpt.safetensors"))  # finished jobs leave no checkpoint

    # Plain diffusers loads the file; its UNet output equals the bank's with the same factors.
    tiny = build_tiny_components(seed=0)
    pipe = __import__("diffusers").StableDiffusionPipeline(
        vae=tiny["vae"], text_encoder=tiny["text_encoder"], tokenizer=tiny["tokenizer"],
        unet=copy.deepcopy(tiny["unet"]), scheduler=tiny["scheduler"], safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    path = loras / f"{train_ids[0]}.safetensors"
    metadata = read_safetensors(path)[1]
    assert metadata["base_model"] == "tiny" and metadata["base_model_revision"] == ""  # no hub revision: not a hub id
    pipe.load_lora_weights(path)
    bank_unet = copy.deepcopy(tiny["unet"])
    bank = LoRABank(bank_unet, n_a=1, rank=2, alpha=2.0)
    bank.set_slot(from_diffusers_state(lora_factors(path)), 0)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = pipe.unet(sample, 500, embeds).sample
        with bank.route([0]):
            ours = bank_unet(sample, 500, embeds).sample
        plain = tiny["unet"](sample, 500, embeds).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(theirs, plain, atol=1e-6)  # the LoRA changes the output


def test_rerun_skips_finished_loras_and_refuses_another_config(invoke, folder_data, tmp_path):
    run = tmp_path / "run"
    assert invoke(*fit_args(folder_data, run))[0] == 0
    before = {p.name: p.read_bytes() for p in (run / "loras" / "loft").glob("*.safetensors")}
    code, out, err = invoke(*fit_args(folder_data, run))
    assert code == 0 and "already trained" in out
    assert {p.name: p.read_bytes() for p in (run / "loras" / "loft").glob("*.safetensors")} == before
    code, _, err = invoke(*fit_args(folder_data, run, "--lr", "0.5"))
    assert code == 2 and "fit.lr" in err and "--force" in err and len(err.strip().splitlines()) == 1
    code, out, err = invoke(*fit_args(folder_data, run, "--lr", "0.5", "--force", "--gradient-checkpointing"))
    assert code == 0, err
    assert "skipped 0" in out  # a new config starts the method over: no LoRA of the old one is kept
    assert {p.name for p in (run / "loras" / "loft").glob("*.safetensors")} == set(before)
    assert all(p.read_bytes() != before[p.name] for p in (run / "loras" / "loft").glob("*.safetensors"))


def test_resume_after_interruption_gives_the_same_weights(invoke, folder_data, tmp_path, monkeypatch):
    extra = ("--batch-size", "3", "--seed", "3")
    assert invoke(*fit_args(folder_data, tmp_path / "straight", *extra))[0] == 0
    # Interrupt the second chunk after its 5th step; checkpoints every 2 steps.
    original = fit_module._Progress.advance
    calls = {"n": 0}

    def interrupting(self, job, step, adapter_steps):
        calls["n"] += 1
        if calls["n"] == 6 + 5:
            raise KeyboardInterrupt
        original(self, job, step, adapter_steps)

    monkeypatch.setattr(fit_module._Progress, "advance", interrupting)
    monkeypatch.setattr(fit_module, "resolved_fit", _with_checkpoint_every(2))
    code, _, err = invoke(*fit_args(folder_data, tmp_path / "resumed", *extra))
    assert code == 130 and "resume" in err
    resumed = tmp_path / "resumed" / "loras" / "loft"
    checkpoint, = (resumed / "checkpoints").glob("*.ckpt.safetensors")
    done_before = {r["image_id"] for r in read_csv(resumed / "index.csv")}
    assert len(done_before) == 3  # the first chunk finished
    monkeypatch.setattr(fit_module._Progress, "advance", original)
    # A pickle planted in its place (a shared file system, a copied run) is refused in one line, never run.
    saved, marker = checkpoint.read_bytes(), tmp_path / "payload-ran"
    checkpoint.write_bytes(pickle.dumps(_Payload(str(marker))))
    code, _, err = invoke(*fit_args(folder_data, tmp_path / "resumed", "--seed", "3"))
    assert code == 2 and str(checkpoint) in err and "never loaded" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    checkpoint.write_bytes(saved)
    # Resumed without --batch-size: the default (sized to the device) must not change the chunking.
    code, out, err = invoke(*fit_args(folder_data, tmp_path / "resumed", "--seed", "3"))
    assert code == 0, err
    assert not list((resumed / "checkpoints").iterdir())
    for path in (tmp_path / "straight" / "loras" / "loft").glob("*.safetensors"):
        a, b = load_file(path), load_file(resumed / path.name)
        assert all(torch.equal(a[k], b[k]) for k in a), path.name


class _Payload:
    """Unpickling this writes a file: the proof that a loader ran a planted pickle's code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "ran"))


def _with_checkpoint_every(every):
    original = fit_module.resolved_fit

    def patched(config):
        import dataclasses

        return dataclasses.replace(original(config), checkpoint_every=every)

    return patched


@pytest.mark.parametrize("method", ["datadream", "chimera"])
def test_class_methods_write_their_files(invoke, folder_data, tmp_path, method):
    run = tmp_path / "run"
    code, _, err = invoke(*fit_args(folder_data, run, "--method", method, "--batch-size", "4"))
    assert code == 0, err
    out = run / "loras" / method
    assert (out / "crack.safetensors").exists() and (run / "stages" / f"fit-{method}.yaml").exists()
    index = read_csv(out / "index.csv")
    assert all(r["method"] == method for r in index)
    if method == "chimera":
        from rareaug.lora.store import export_mix

        heads = [r["image_id"] for r in index]
        assert len(heads) >= 2
        mixed = export_mix(out / "crack.safetensors", {heads[0]: 0.5, heads[1]: 0.5}, tmp_path / "mix.safetensors")
        code, _, err = invoke("export-mix", "--run", run, "--heads", f"{heads[0]}=0.5,{heads[1]}=0.5",
                              "--out", tmp_path / "cli-mix.safetensors")
        assert code == 0, err
        assert load_file(tmp_path / "cli-mix.safetensors").keys() == load_file(mixed).keys()
        code, _, err = invoke("export-mix", "--run", run, "--heads", "r9999=1", "--out", tmp_path / "x.safetensors")
        assert code == 2 and "r9999" in err
        factors = from_diffusers_state(load_file(mixed))
        whole = load_file(out / "crack.safetensors")
        key = next(k for k in whole if k.endswith(".B"))
        assert torch.allclose(factors[key], 0.5 * whole[key][0] + 0.5 * whole[key][1])


def test_chimera_semantic_boost_with_masks_is_recorded_and_switchable(invoke, mt_data, tmp_path):
    """Mask data: the shared A also trains on boosted views (cached apart from the posteriors every method
    shares); --no-semantic-boost is another fit config, refused without --force, and gives another A."""
    # A learns from step 2, once the heads of step 1's images are no longer zero (every image is in step 1)
    (tmp_path / "recipe.yaml").write_text("fit:\n  warmup_steps: 0\n")
    run = tmp_path / "run"
    args = ("fit", "--data", mt_data, "--rare", "crack", "--run", run, "--method", "chimera", "--base-model", "tiny",
            "--resolution", "32", "--steps", "2", "--config", tmp_path / "recipe.yaml")
    code, out, err = invoke(*args)
    assert code == 0, err
    n_train = len(read_csv(run / "loras" / "chimera" / "index.csv"))
    assert f"semantic boosting on {n_train} of {n_train} image(s)" in out
    assert yaml.safe_load((run / "stages" / "fit-chimera.yaml").read_text())["fit"]["semantic_boost"] is True
    assert len(list((run / "cache").glob("train-boost-*.safetensors"))) == 1
    boosted = load_file(run / "loras" / "chimera" / "Crack.safetensors")
    code, _, err = invoke(*args, "--no-semantic-boost")
    assert code == 2 and "fit.semantic_boost" in err and "--force" in err
    code, out, err = invoke(*args, "--no-semantic-boost", "--force")
    assert code == 0, err
    assert "semantic boosting" not in out
    plain = load_file(run / "loras" / "chimera" / "Crack.safetensors")
    assert any(not torch.equal(boosted[key], plain[key]) for key in boosted if key.endswith(".A"))


def test_fit_errors_come_before_any_model_is_loaded(invoke, folder_data, tmp_path, monkeypatch):
    import rareaug.models as models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(models, "load_base_model", no_loading)
    code, _, err = invoke(*fit_args(folder_data, tmp_path / "a", "--resolution", "60"))
    assert code == 2 and "multiple of 8" in err
    code, _, err = invoke(*fit_args(folder_data, tmp_path / "a", "--text-encoder-lora"))
    assert code == 2 and "datadream" in err and len(err.strip().splitlines()) == 1
    code, _, err = invoke(*fit_args(folder_data, tmp_path / "a", "--no-semantic-boost"))
    assert code == 2 and "--no-semantic-boost goes with --method chimera" in err and len(err.strip().splitlines()) == 1
    code, _, err = invoke("fit", "--data", folder_data, "--rare", "crack", "--run", tmp_path / "b",
                          "--base-model", str(tmp_path / "nowhere" / "model.txt"))
    assert code == 2 and "model.txt" in err and len(err.strip().splitlines()) == 1
    few = tmp_path / "few"
    for i in range(5):
        __import__("conftest").write_image(few / "crack" / f"{i}.png")
    for i in range(10):
        __import__("conftest").write_image(few / "normal" / f"{i}.png")
    code, _, err = invoke("fit", "--data", few, "--rare", "crack", "--run", tmp_path / "c", *FAST,
                          "--test-fraction", "0.4", "--val-fraction", "0.55")
    assert code == 2 and "at least 2" in err and len(err.strip().splitlines()) == 1

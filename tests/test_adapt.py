"""`rareaug adapt` on the tiny model: the three conditionings, files diffusers loads, folds, resume, unlabeled
images checked against held-out ones, and the later stages naming the base they used."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file

import rareaug.adapt.stage as adapt_stage
from rareaug.adapt import language_free
from rareaug.errors import RareaugError
from rareaug.models import build_tiny_components, load_base_model
from rareaug.models.adapted import LORA_FILE, resolve_adapted
from rareaug.split import fold_view, read_split
from tests.conftest import tree_snapshot, write_dicom

WHOLE_BANK = language_free.candidate_words  # before any test narrows it
FAST = ("--base-model", "tiny", "--resolution", "64", "--steps", "3", "--batch-size", "2")


def adapt_args(data, run, *extra, rare="crack"):
    return ("adapt", "--data", data, "--rare", rare, "--run", run, *FAST, *extra)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(autouse=True)
def small_word_bank(monkeypatch):
    """The retrieval bank without the tokenizer's ~30,000 words (6 s a run on the CPU); the test of retrieval over
    the whole vocabulary is test_whole_vocabulary_is_in_the_bank."""
    monkeypatch.setattr(language_free, "candidate_words", lambda tokenizer, texts, vocabulary=True:
                        WHOLE_BANK(tokenizer, texts + ["a photo of a tile"], vocabulary=False))


def test_whole_vocabulary_is_in_the_bank():
    from rareaug.models import clip_tokenizer

    bank = WHOLE_BANK(clip_tokenizer(), ["An X-ray of a pneumo-thorax"])
    assert {"pneumo-thorax", "ray", "pullover", "sweater", "crack"} <= set(bank) and len(bank) > 20000
    assert all(word.isascii() and word == word.lower() for word in bank)


def only_variant(run):
    variant, = [path.name for path in (run / "adapted").iterdir()]
    return variant


@pytest.mark.parametrize("conditioning", ["labels", "domain", "language-free"])
def test_each_conditioning_adapts_a_model_diffusers_loads(invoke, folder_data, tmp_path, conditioning):
    run = tmp_path / "run"
    code, _, err = invoke(*adapt_args(folder_data, run, "--conditioning", conditioning, "--pseudo-tokens", "3"))
    assert code == 0, err
    variant = only_variant(run)
    part = run / "adapted" / variant
    assert variant.startswith(conditioning + "-")
    meta = json.loads((part / "adapted.json").read_text())
    train = [row for row in read_split(run / "split.csv") if row.split == "train"]
    assert meta["conditioning"] == conditioning and meta["parts"][0]["labelled_images"] == len(train)
    assert len({row.cls for row in train}) == 3  # every class trains the adapted model, not only the rare one
    # The reference: a plain diffusers pipeline of the same base, loading the LoRA (and tokens) with its own loaders.
    pipe = _tiny_pipeline()
    pipe.load_lora_weights(str(part), weight_name=LORA_FILE)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    ours = load_base_model(f"adapted:{variant}", run=run)
    reference, original = pipe.unet.state_dict(), build_tiny_components()["unet"].state_dict()
    for key, value in ours.unet.state_dict().items():
        assert torch.allclose(value, reference[key], atol=1e-6), key
    assert any(not torch.equal(value, original[key]) for key, value in ours.unet.state_dict().items())
    assert ours.name == f"adapted:{variant}" and ours.weights_hash != load_base_model("tiny").weights_hash
    tokens = sorted((part / "tokens").glob("*.safetensors"))
    if conditioning == "language-free":
        assert len(tokens) == 3
        saved = load_file(tokens[0])
        pipe.load_textual_inversion(str(tokens[0]))
        name, = saved
        row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(name)]
        assert torch.allclose(row, saved[name])
        ids = ours.tokenizer(f"a photo of a {name}").input_ids
        assert ours.tokenizer.convert_tokens_to_ids(name) in ids  # the adapted base understands its tokens
        record = json.loads((part / "tokens.json").read_text())
        assert len(record["assignment"]) == len(train) and set(record["assignment"]) == {0, 1, 2}
    else:
        assert not tokens


def test_contrastive_optimisation_aligns_pseudo_prompts_with_their_images():
    """Lafite2's second step: after retrieval, the optimisation must pull each pseudo prompt toward its image."""
    base = load_base_model("tiny")
    clip = language_free.load_clip(None, "tiny", base.text_encoder)
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features = language_free.image_features(clip, images, None)
    found = {}
    for steps in (0, 60):
        pseudo = language_free.make_pseudo_text(clip, base.tokenizer, features, "a photo of a {class}",
                                                ["a photo of a crack"], 0, steps, 0.0,
                                                torch.Generator().manual_seed(0), 0)
        found[steps] = language_free.alignment(clip, base.tokenizer, pseudo, "a photo of a {class}", features)
    assert found[60]["top1"] > found[0]["top1"]
    assert found[60]["top1"] >= 0.8


def test_bare_adapted_means_the_only_variant_and_a_wrong_name_lists_them(tmp_path):
    root = tmp_path / "run" / "adapted"
    (root / "labels-1").mkdir(parents=True)
    (root / "labels-1" / "adapted.json").write_text("{}")
    (root / "unfinished").mkdir()  # no adapted.json: not offered
    assert resolve_adapted(root, "adapted") == "adapted:labels-1"
    (root / "domain-2").mkdir()
    (root / "domain-2" / "adapted.json").write_text("{}")
    for spec, expected in (("adapted", "has 2 adapted models"), ("adapted:unfinished", "no finished adapted model")):
        with pytest.raises(RareaugError) as error:
            resolve_adapted(root, spec)
        assert expected in str(error.value) and "adapted:domain-2, adapted:labels-1" in str(error.value)


def test_folds_adapt_one_model_per_fold_and_loras_follow_their_fold(invoke, folder_data, tmp_path):
    run = tmp_path / "run"
    assert invoke(*adapt_args(folder_data, run, "--folds", "2"))[0] == 0
    variant = only_variant(run)
    rows = read_split(run / "split.csv")
    meta = json.loads((run / "adapted" / variant / "adapted.json").read_text())
    for k in range(2):
        assert (run / "adapted" / variant / f"f{k}" / "done.json").is_file()
        assert meta["parts"][k]["labelled_images"] == len(fold_view(rows, 2, k).train)
    code, _, err = invoke("fit", "--run", run, "--base-model", "adapted", "--steps", "2")
    assert code == 0, err
    units = {row["lora"] for row in read_csv(run / "loras" / "loft" / "index.csv")}
    assert units == {f"{row.id}-f{k}" for k in range(2) for row in fold_view(rows, 2, k).rare_train}
    code, _, err = invoke("generate", "--run", run, "--n", "2", "--steps", "2", "--no-guard", "--fold", "1")
    assert code == 0, err
    pool, = (run / "synthetic").iterdir()
    fold_ids = {row.id for row in fold_view(rows, 2, 1).rare_train}
    for row in read_csv(pool / "manifest.csv"):
        for unit in row["loras"].split(";"):
            assert unit.endswith("-f1") and unit[:-3] in fold_ids
    index = read_csv(run / "loras" / "loft" / "index.csv")
    assert {row["base_model"] for row in index} == {f"adapted:{variant}"}
    fold0 = load_base_model(f"adapted:{variant}", run=run, fold=0)
    fold1 = load_base_model(f"adapted:{variant}", run=run, fold=1)
    assert fold0.weights_hash != fold1.weights_hash
    manifest = read_csv(pool / "manifest.csv")
    assert {row["base_model"] for row in manifest} == {f"adapted:{variant}"}
    assert {row["base_model_hash"] for row in manifest} == {fold1.weights_hash}
    assert invoke("report", "--run", run)[0] == 0
    assert f"base model: adapted:{variant}" in (run / "report.html").read_text()
    code, _, err = invoke("generate", "--run", run, "--n", "2", "--method", "classprompt", "--base-model",
                          f"adapted:{variant}")
    assert code == 2 and "--fold" in err


def test_resume_after_interruption_gives_the_same_adapted_weights(invoke, folder_data, tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("adapt:\n  checkpoint_every: 2\n")
    extra = ("--steps", "6", "--conditioning", "language-free", "--pseudo-tokens", "2", "--config", str(recipe))
    assert invoke(*adapt_args(folder_data, tmp_path / "straight", *extra))[0] == 0
    original, calls = adapt_stage.F.mse_loss, {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(adapt_stage.F, "mse_loss", interrupting)
    # Stopped twice: on step 1 (tokens made, no checkpoint yet), then on step 5 (checkpoint of step 4).
    calls["n"] = 4
    assert invoke(*adapt_args(folder_data, tmp_path / "resumed", *extra))[0] == 130
    variant = only_variant(tmp_path / "resumed")
    assert (tmp_path / "resumed" / "adapted" / variant / "tokens.json").is_file()
    assert not (tmp_path / "resumed" / "adapted" / variant / "checkpoint.safetensors").exists()
    calls["n"] = 0
    code, _, _ = invoke(*adapt_args(folder_data, tmp_path / "resumed", *extra))
    assert code == 130
    assert (tmp_path / "resumed" / "adapted" / variant / "checkpoint.safetensors").is_file()
    monkeypatch.setattr(adapt_stage.F, "mse_loss", original)
    code, _, err = invoke(*adapt_args(folder_data, tmp_path / "resumed", *extra))
    assert code == 0, err
    assert only_variant(tmp_path / "straight") == variant
    for name in (LORA_FILE, "tokens/0.safetensors", "losses.csv"):
        a, b = (tmp_path / run / "adapted" / variant / name for run in ("straight", "resumed"))
        if name.endswith(".csv"):
            assert a.read_text() == b.read_text()
        else:
            assert all(torch.equal(x, load_file(b)[k]) for k, x in load_file(a).items()), name
    assert not (tmp_path / "resumed" / "adapted" / variant / "checkpoint.safetensors").exists()
    # Stopped after its last part but before adapted.json: a rerun writes it instead of training again.
    meta = tmp_path / "resumed" / "adapted" / variant / "adapted.json"
    written = json.loads(meta.read_text())
    meta.unlink()
    code, out, _ = invoke(*adapt_args(folder_data, tmp_path / "resumed", *extra))
    assert code == 0 and "already adapted" in out and json.loads(meta.read_text()) == written
    # A base model whose weights changed since is refused in one line, never fused with the wrong weights.
    meta.write_text(json.dumps({**written, "base_model_hash": "0" * 16}))
    with pytest.raises(RareaugError, match="now has weights"):
        load_base_model(f"adapted:{variant}", run=tmp_path / "resumed")


def test_unlabeled_images_that_copy_held_out_ones_are_refused(invoke, folder_data, tmp_path):
    run = tmp_path / "run"
    assert invoke("inspect", "--data", folder_data, "--rare", "crack", "--run", run)[0] == 0
    rows = read_split(run / "split.csv")
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for row in [row for row in rows if row.split in ("val", "test")][:3]:
        shutil.copy(row.abs_path, unlabeled / f"copy-{row.id}{row.abs_path.suffix}")
    (unlabeled / "more").mkdir()
    for i in range(4):  # seeds of their own: tests.conftest's counter is another module's than pytest's conftest
        pixels = np.random.default_rng(10_000 + i).integers(0, 256, (32, 32), dtype=np.uint8)
        Image.fromarray(pixels).save(unlabeled / "more" / f"new{i}.png")
    (unlabeled / "readme.txt").write_text("not an image")
    marked = PngImagePlugin.PngInfo()
    marked.add_text("rareaug:synthetic", "true")  # an image rareaug generated: never real data
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(unlabeled / "made-by-rareaug.png", pnginfo=marked)
    (unlabeled / "broken.png").write_bytes(b"not a png")
    before = tree_snapshot(folder_data), tree_snapshot(unlabeled)
    code, _, err = invoke(*adapt_args(folder_data, run, "--unlabeled", unlabeled))
    assert code == 0, err
    variant = only_variant(run)
    counts = json.loads((run / "adapted" / variant / "adapted.json").read_text())["unlabeled"]
    assert counts["found"] == 7 and counts["unreadable"] == 1 and counts["synthetic"] == 1
    assert counts["parts"][0] == {"fold": 0, "used": 4, "near_duplicates_of_held_out": 3, "held_out_patients": 0}
    assert (tree_snapshot(folder_data), tree_snapshot(unlabeled)) == before  # inputs are read only
    code, out, _ = invoke("inspect", "--data", folder_data, "--rare", "crack", "--run", run)
    assert code == 0 and f"adapted:{variant}" in out and "refused 3 near-copies" in out.replace("\n", " ")
    written = " ".join(path.read_text(errors="ignore") for path in (run / "adapted").rglob("*.json"))
    assert "copy-" not in written and str(unlabeled) not in written  # ids and counts only, never paths


def test_unlabeled_dicom_of_a_held_out_patient_is_refused(invoke, dicom_data, tmp_path):
    run = tmp_path / "run"
    assert invoke("inspect", "--data", dicom_data, "--rare", "pneumothorax", "--run", run)[0] == 0
    rows = read_split(run / "split.csv")
    test_row = next(row for row in rows if row.split == "test")
    import pydicom

    patient = pydicom.dcmread(test_row.abs_path).PatientID
    unlabeled = tmp_path / "unlabeled"
    write_dicom(unlabeled / "same-patient.dcm", "Someone^Else", patient, seed=999)  # new pixels, known patient
    write_dicom(unlabeled / "new-patient.dcm", "New^Patient", "PID-NEW-1", seed=998)
    code, _, err = invoke("adapt", "--data", dicom_data, "--rare", "pneumothorax", "--run", run, *FAST,
                          "--unlabeled", unlabeled)
    assert code == 0, err
    variant = only_variant(run)
    meta_text = (run / "adapted" / variant / "adapted.json").read_text()
    assert json.loads(meta_text)["unlabeled"]["parts"][0]["held_out_patients"] == 1
    assert json.loads(meta_text)["unlabeled"]["parts"][0]["used"] == 1
    assert "PID-" not in meta_text and "Doe^" not in meta_text


def test_adapt_bad_input_is_one_line(invoke, folder_data, tmp_path):
    run = tmp_path / "run"
    cases = [
        (("--conditioning", "captions"), "--conditioning"),
        (("--unlabeled", tmp_path / "missing"), "no such folder"),
        (("--base-model", "adapted"), "original model"),
        (("--rank", "-1"), "--rank"),
        (("--conditioning", "language-free", "--clip-model", tmp_path), "--clip-model"),
        (("--unlabeled", run), "rareaug run or export folder"),
    ]
    for extra, expected in cases:
        code, _, err = invoke(*adapt_args(folder_data, run, *extra))
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (extra, err)
    code, _, err = invoke("fit", "--data", folder_data, "--rare", "crack", "--run", tmp_path / "other",
                          "--base-model", "adapted")
    assert code == 2 and "rareaug adapt" in err and len(err.strip().splitlines()) == 1


def _tiny_pipeline():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**build_tiny_components(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

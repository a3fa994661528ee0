"""The shipped mini base model and the real Fashion-MNIST data it was trained on."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from rareaug.errors import RareaugError
from rareaug.models import load_base_model
from rareaug.samples import FASHION_COUNTS, fashion_root
from rareaug.samples.fashion_mnist import (
    CLASSES,
    COMMON_CLASSES,
    RARE_CLASSES,
    fashion_mnist_folder,
    load_fashion_mnist,
    seeded_subset,
)

try:
    fashion_mnist_folder()
    HAVE_FASHION_MNIST = True
except RareaugError:
    HAVE_FASHION_MNIST = False
needs_fashion_mnist = pytest.mark.skipif(not HAVE_FASHION_MNIST,
                                         reason="dataset-fashion-mnist is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def mini():
    return load_base_model("mini")


def test_mini_loads_offline_with_the_real_tokenizer(mini, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert len(mini.tokenizer) == 49408
    assert mini.vae.config.block_out_channels and 2 ** (len(mini.vae.config.block_out_channels) - 1) == 4
    assert mini.sampling_scheduler == "DPMSolverMultistepScheduler"
    assert mini.prediction_type == "epsilon" and not mini.is_tiny
    assert all(not p.requires_grad for p in mini.unet.parameters())
    # The prompt words it was trained on and a rare one tokenize to distinct real BPE ids.
    ids = mini.tokenizer(["a photo of a sneaker", "a photo of a pullover"]).input_ids
    assert ids[0] != ids[1] and max(max(i) for i in ids) < 49408


@needs_fashion_mnist
def test_mini_quality_gate_at_small_scale(mini):
    """The card's gate on 16 samples per class instead of 64. The shipped v2 does not pass it (the judge calls
    many footwear samples bags; the card says so): this holds what it does reach, which v1 did not (25-88% per
    class on 8 samples) — the prompt moves an image more than the seed, most samples are judged as asked, and
    the verdict is the rule applied to the figures."""
    from rareaug.models.mini.gate import MIN_MEAN, MIN_PER_CLASS, quality_gate

    gate = quality_gate(mini, torch.device("cpu"), n=16, classes=COMMON_CLASSES)
    assert gate["prompt_moves"] > gate["seed_moves"]
    assert gate["mean_seen"] >= 0.75 and gate["agreement"]["trouser"] >= 0.9, gate["agreement"]
    assert gate["passed"] == (gate["min_seen"] >= MIN_PER_CLASS and gate["mean_seen"] >= MIN_MEAN
                              and gate["prompt_moves"] > gate["seed_moves"])


def test_shipped_card_reports_the_shipped_weights_own_figures():
    """training.json is what the card shows: the full run (no early stop), the gate on 64 samples passed,
    the EMA weights' own loss, the CLIP's zero-shot accuracy and the autoencoder's held-out error."""
    import json

    from rareaug.models.mini import MINI_FOLDER

    summary = json.loads((MINI_FOLDER / "training.json").read_text())
    card = (MINI_FOLDER / "README.md").read_text()
    assert summary["unet_steps"] == summary["recipe"]["unet_steps"]
    gate = summary["gate"]
    assert gate["samples_per_class"] == 64 and ("**Passed**" if gate["passed"] else "**NOT passed**") in card
    assert f"{gate['mean_seen']:.1%}" in card
    assert f"{summary['unet_ema_loss']:.4f}" in card and f"{summary['clip_zero_shot']['overall']:.1%}" in card
    assert "never seen pullover, dress, coat, shirt" in card
    sizes = sum(f.stat().st_size for f in MINI_FOLDER.glob("*/*.safetensors"))
    assert sizes <= 16e6, sizes


@needs_fashion_mnist
def test_mini_autoencoder_reconstructs_held_out_garments_as_its_card_says(mini):
    """Held-out real test images of all ten classes (the four the UNet never saw included), 50 of each: the
    pixel MSE is the card's figure (measured there on all 10,000) and below v1's 0.0121 on training images."""
    import json

    from rareaug.models.mini import MINI_FOLDER
    from rareaug.models.mini.train import to_model_range

    images, labels = load_fashion_mnist("test")
    pick = np.concatenate([np.flatnonzero(labels == k)[:50] for k in range(10)])
    x = to_model_range(images[pick])
    with torch.no_grad():
        reconstruction = mini.vae.decode(mini.vae.encode(x).latent_dist.mode()).sample
    mse = float((reconstruction - x).pow(2).mean())
    card = json.loads((MINI_FOLDER / "training.json").read_text())["vae_test_mse"]["overall"]
    assert mse == pytest.approx(card, rel=0.2) and mse < 0.0121


def test_mini_text_encoder_is_its_clips_text_tower():
    from rareaug.models.mini import MINI_FOLDER, load_mini_clip, load_mini_components

    clip = load_mini_clip(MINI_FOLDER)
    text_encoder = load_mini_components(MINI_FOLDER)["text_encoder"]
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 49407] + [49407] * 71])
    with torch.no_grad():
        assert torch.equal(text_encoder(ids)[0], clip.text_model(ids)[0])
        assert clip.get_image_features(pixel_values=torch.zeros(1, 3, 32, 32)) is not None


@needs_fashion_mnist
def test_fashion_mnist_reader_gives_the_real_test_set():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert set(RARE_CLASSES) | set(COMMON_CLASSES) == set(CLASSES)


@needs_fashion_mnist
def test_seeded_subset_is_stable_and_class_pure():
    _, labels = load_fashion_mnist("train")
    a = seeded_subset(labels, {"pullover": 5, "bag": 3}, seed=1)
    b = seeded_subset(labels, {"pullover": 5, "bag": 3}, seed=1)
    assert a.tolist() == b.tolist()
    assert [CLASSES[i] for i in labels[a]] == ["pullover"] * 5 + ["bag"] * 3
    with pytest.raises(RareaugError, match="6000 bag images"):
        seeded_subset(labels, {"bag": 6001}, seed=0)


def test_truncated_fashion_mnist_file_is_one_line_error(tmp_path, monkeypatch):
    header = b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(header + b"\x00" * 100)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(RareaugError, match="truncated.*reinstall dataset-fashion-mnist"):
        load_fashion_mnist("train")


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr("rareaug.samples.fashion_mnist.DEBIAN_FOLDER", tmp_path / "absent")
    with pytest.raises(RareaugError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_folder()


def test_shipped_fashion_sample_has_its_licence_and_counts():
    root = fashion_root()
    assert "MIT" in (root / "LICENSE.txt").read_text()
    for name, count in FASHION_COUNTS.items():
        files = sorted((root / name).glob("fm-train-*.png"))
        assert len(files) == count
    from PIL import Image

    assert Image.open(files[0]).size == (32, 32)


def test_fit_runs_on_mini(invoke, tmp_path):
    run = tmp_path / "run"
    code, _, err = invoke("fit", "--config", "fashion_mnist", "--data", str(fashion_root()), "--rare", "pullover",
                          "--run", str(run), "--method", "loft", "--steps", "3", "--device", "cpu")
    assert code == 0, err
    import csv

    rows = list(csv.DictReader(open(run / "loras" / "loft" / "index.csv")))
    assert len(rows) == len(list((run / "loras" / "loft").glob("*.safetensors"))) > 0
    assert {row["base_model"] for row in rows} == {"mini"}

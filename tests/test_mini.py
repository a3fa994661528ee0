"""The shipped mini base model and the real Fashion-MNIST data it was trained on."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from rareaug.errors import RareaugError
from rareaug.models import load_base_model
from rareaug.samples import FASHION_COUNTS, fashion_root
from rareaug.samples.fashion_mnist import (CLASSES, COMMON_CLASSES, RARE_CLASSES, fashion_mnist_folder,
                                           load_fashion_mnist, seeded_subset)

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
def test_mini_draws_the_common_class_it_is_asked_for(mini):
    """A small CNN trained on real Fashion-MNIST agrees with the prompt for most samples of the seen classes."""
    from rareaug.generate.sampler import BankSampler, SampleRequest
    from rareaug.models.mini.check import judge_images, train_judge

    judge = train_judge(n_images=12000, epochs=2)
    agree, total = 0, 0
    for name in COMMON_CLASSES:
        sampler = BankSampler(mini, None, f"a photo of a {name}", 3.0, 20, "default", torch.device("cpu"), 32)
        images = sampler.sample([SampleRequest([], [], [], seed) for seed in range(6)])
        assert images.shape == (6, 3, 32, 32)
        judged = judge_images(judge, images)
        agree += sum(j == name for j in judged)
        total += len(judged)
    assert agree / total > 0.5, f"only {agree}/{total} samples were judged the prompted class"


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

"""CutPaste and Perlin defects: seeded, masks aligned with the pixels they changed; the shipped crack sample."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_adapters import load_dataset, load_mask
from rareaug.generate.defects import cutpaste, perlin
from rareaug.samples import DEFECT_COUNTS, defect_root


def images(height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, height, width, generator=generator), torch.rand(3, height, width, generator=generator)


def blob_mask(height: int, width: int) -> torch.Tensor:
    """An asymmetric L-shaped defect, so a flip or a turn shows in its shape."""
    mask = torch.zeros(height, width)
    mask[5:20, 8:12] = 1
    mask[16:20, 12:24] = 1
    return mask


def assert_aligned(image: torch.Tensor, mask: torch.Tensor, normal: torch.Tensor) -> None:
    """The image is the normal image exactly outside the mask, and differs from it at every masked pixel."""
    assert image.dtype == torch.float32 and mask.dtype == torch.float32
    assert image.shape == normal.shape and mask.shape == normal.shape[1:]
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
    assert 0 <= image.min() and image.max() <= 1
    outside = mask == 0
    assert torch.equal(image[:, outside], normal[:, outside])
    assert (image != normal).any(dim=0)[~outside].all()


def dihedral(mask: torch.Tensor) -> list[torch.Tensor]:
    return [m.rot90(turns) for m in (mask, mask.flip(-1)) for turns in range(4)]


def cropped(mask: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


@pytest.mark.parametrize("with_mask", [True, False])
def test_cutpaste_is_reproducible(with_mask):
    normal, donor = images(64, 64)
    donor_mask = blob_mask(64, 64) if with_mask else None
    first = cutpaste(normal, donor, donor_mask, np.random.default_rng(7))
    again = cutpaste(normal, donor, donor_mask, np.random.default_rng(7))
    other = cutpaste(normal, donor, donor_mask, np.random.default_rng(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_perlin_is_reproducible():
    normal, texture = images(64, 64)
    first = perlin(normal, texture, np.random.default_rng(7))
    again = perlin(normal, texture, np.random.default_rng(7))
    other = perlin(normal, texture, np.random.default_rng(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_cutpaste_pastes_the_donor_defect_in_its_own_shape(size):
    normal, donor = images(*size)
    donor_mask = blob_mask(*size)
    for seed in range(10):
        for given in (donor_mask, donor_mask.bool()):
            image, mask = cutpaste(normal, donor, given, np.random.default_rng(seed))
            assert_aligned(image, mask, normal)
            assert mask.sum() == donor_mask.sum()
            assert any(torch.equal(cropped(mask), m) for m in dihedral(cropped(donor_mask)))


@pytest.mark.parametrize("donor_mask", [None, torch.zeros(64, 64)], ids=["none", "empty"])
def test_cutpaste_without_a_defect_pastes_a_rectangle(donor_mask):
    normal, donor = images(64, 64)
    for seed in range(10):
        image, mask = cutpaste(normal, donor, donor_mask, np.random.default_rng(seed))
        assert_aligned(image, mask, normal)
        assert cropped(mask).all()  # a full rectangle
        assert 0.015 <= mask.mean() <= 0.17  # CutPaste's 2-15% of the image, give or take rounding


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (256, 256), (40, 96)])
def test_perlin_mask_is_never_empty_and_aligned(size):
    normal, texture = images(*size)
    for seed in range(10):
        image, mask = perlin(normal, texture, np.random.default_rng(seed))
        assert_aligned(image, mask, normal)


def test_mismatched_sizes_are_refused():
    normal, donor = images(64, 64)
    with pytest.raises(ValueError, match="resize"):
        cutpaste(normal, donor[:, :32], None, np.random.default_rng(0))
    with pytest.raises(ValueError, match="donor_mask"):
        cutpaste(normal, donor, torch.ones(1, 64, 64), np.random.default_rng(0))
    with pytest.raises(ValueError, match="grayscale"):
        perlin(normal[:1], donor[:1], np.random.default_rng(0))


def test_shipped_crack_sample_loads_as_mvtec_with_masks():
    dataset = load_dataset(defect_root(), "mvtec", "crack")
    assert dataset.layout == "mvtec" and dataset.rare == "crack"
    cracks = [record for record in dataset.records if record.is_rare]
    assert len(cracks) == DEFECT_COUNTS["test/crack"]
    assert dataset.classes == {"crack": DEFECT_COUNTS["test/crack"],
                               "good": DEFECT_COUNTS["train/good"] + DEFECT_COUNTS["test/good"]}
    for record in dataset.records:
        assert (record.width, record.height) == (64, 64)
        assert (record.mask_path is not None) == record.is_rare
    for record in cracks:
        mask = load_mask(record.mask_path)
        assert mask.shape == (record.height, record.width) and 0 < mask.sum() < mask.size
    assert "NOT real" in (defect_root().parent / "LICENSE.txt").read_text()

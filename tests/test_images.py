"""The recipe crops, and ChimeraLoRA's semantic-boosting views that keep the mask's box whole."""
from __future__ import annotations

import numpy as np
import torch
from conftest import write_mask
from PIL import Image

from rareaug.images import boost_squares, boosted_inputs


def test_every_boosted_square_holds_the_whole_box():
    rng = np.random.default_rng(0)
    for case in range(300):
        width, height = (int(v) for v in rng.integers(8, 120, 2))
        bx0, by0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (bx0, by0, int(rng.integers(bx0 + 1, width + 1)), int(rng.integers(by0 + 1, height + 1)))
        smallest = max(box[2] - box[0], box[3] - box[1])
        for x0, y0, side in boost_squares(width, height, box, 4, torch.Generator().manual_seed(case)):
            assert x0 <= box[0] and y0 <= box[1] and x0 + side >= box[2] and y0 + side >= box[3], (case, box)
            # From the smallest square holding the box to the largest inside the image; a box longer than the
            # image's short side makes the square span (and pad) that side, up to the long side.
            assert smallest <= side <= (min(width, height) if smallest <= min(width, height) else max(width, height))
            for start, size in ((x0, width), (y0, height)):
                assert (0 <= start <= size - side) if side <= size else (size - side <= start <= 0), (case, box)
    ones = boost_squares(100, 60, (40, 20, 50, 30), 50, torch.Generator().manual_seed(1))
    assert len({side for _, _, side in ones}) > 10 and len({(x, y) for x, y, _ in ones}) > 10  # varied, not one crop
    again = boost_squares(100, 60, (40, 20, 50, 30), 50, torch.Generator().manual_seed(1))
    assert again == ones  # seeded


def test_boosted_views_show_the_box_whole_and_fall_back_without_a_mask(tmp_path):
    # A black image with a white defect box: every view, whatever its crop, holds all of the box's white.
    pixels = np.zeros((48, 64), np.uint8)
    box = (10, 30, 22, 40)
    pixels[box[1]:box[3], box[0]:box[2]] = 255
    Image.fromarray(pixels).save(tmp_path / "image.png")
    mask = write_mask(tmp_path / "mask.png", size=48, box=(0, 0, 0, 0))  # an empty mask: no views
    assert boosted_inputs(tmp_path / "image.png", mask, 32, 4, torch.Generator()) == []
    assert boosted_inputs(tmp_path / "image.png", None, 32, 4, torch.Generator()) == []
    assert boosted_inputs(tmp_path / "image.png", tmp_path / "missing.png", 32, 4, torch.Generator()) == []
    mask_array = np.zeros((48, 64), np.uint8)
    mask_array[box[1]:box[3], box[0]:box[2]] = 255
    Image.fromarray(mask_array).save(tmp_path / "mask.png")
    generator = torch.Generator().manual_seed(0)
    views = boosted_inputs(tmp_path / "image.png", tmp_path / "mask.png", 32, 4, generator)
    squares = boost_squares(64, 48, box, 4, torch.Generator().manual_seed(0))
    assert len(views) == 4 and len({side for _, _, side in squares}) > 1
    area = (box[2] - box[0]) * (box[3] - box[1])
    for view, (_, _, side) in zip(views, squares):
        assert view.shape == (3, 32, 32) and view.min() >= -1 and view.max() <= 1
        white = ((view[0] + 1) / 2).sum().item() * (side / 32) ** 2  # back in source pixels
        assert abs(white - area) < 0.02 * area, (white, area, side)

"""The memorization guard judges copies relative to the real images' own spread (Carlini et al. 2023): copies,
JPEG re-encodes, small brightness changes and 1-2 pixel shifts of real images are caught on smooth images and
on textures, independent real images pass, and a pool the guard stops never stops the sweep."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rareaug.generate.stage as stage
from rareaug.generate.guard import Guard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from guard_calibration import COPIES, domain_sets, evaluate  # noqa: E402


def _domain(name: str):
    from rareaug.errors import RareaugError

    try:
        return domain_sets(name, independent=30)
    except RareaugError as error:  # Fashion-MNIST comes from a Debian package (.ci/run installs it)
        pytest.skip(str(error))


@pytest.mark.parametrize("domain", ["fashion", "radiographs", "textures"])
def test_the_default_rule_catches_altered_copies_and_passes_independent_images(domain):
    reference, independent = _domain(domain)
    result = evaluate(reference, independent)  # relative rule, ratio 0.5: what generate uses
    assert {name: result["caught"][name] for name in COPIES} == {name: 1.0 for name in COPIES}
    assert result["independent_passed"] == 1.0, result["independent_score_min"]


def test_the_absolute_rule_fails_textures_which_is_why_it_is_not_the_default():
    reference, independent = _domain("textures")
    assert evaluate(reference, independent, rule="absolute")["independent_passed"] < 0.8


def test_relative_score_is_the_nearest_distance_over_the_mean_of_the_next_ones():
    generator = torch.Generator().manual_seed(0)
    reals = torch.rand(8, 1, 32, 32, generator=generator)
    images = torch.cat([reals[:2] * 0.97, torch.rand(3, 1, 32, 32, generator=generator)])
    guard = Guard(reals, [f"r{i}" for i in range(8)], rule="relative", ratio=0.5)
    distances = np.sort(guard.distances(images).numpy(), axis=1)
    expected = distances[:, 0] / distances[:, 1:6].mean(axis=1)
    judged = guard.judge(images)
    np.testing.assert_allclose(judged.scores, expected, rtol=1e-5)
    assert judged.copies == list(expected < 0.5) and judged.copies[:2] == [True, True]
    assert judged.nearest_ids[:2] == ["r0", "r1"] and guard.record()["guard_neighbours"] == 5


def test_a_shift_is_searched_at_the_images_own_resolution():
    """Two pixels of a 32 px image are four of the guard's 64: the search widens with the upsampling."""
    assert Guard(torch.rand(3, 1, 32, 32), ["a", "b", "c"]).shift == 4
    assert Guard(torch.rand(3, 1, 512, 512), ["a", "b", "c"]).shift == 1


# --- generate and sweep on textures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def texture_run(tmp_path_factory):
    """A LoFT fit on the shipped textures (gravel rare), where the old absolute guard rejected everything."""
    from typer.testing import CliRunner

    from rareaug.cli import app
    from rareaug.samples import sample_root

    data = shutil.copytree(sample_root(), tmp_path_factory.mktemp("textures") / "data")
    run = tmp_path_factory.mktemp("runs") / "run"
    result = CliRunner().invoke(app, ["fit", "--data", str(data), "--rare", "gravel", "--run", str(run),
                                      "--base-model", "tiny", "--resolution", "64", "--steps", "2"])
    assert result.exit_code == 0, result.stderr
    return run


def test_generate_on_textures_completes_with_the_relative_guard(invoke, texture_run, tmp_path):
    run = shutil.copytree(texture_run, tmp_path / "run")
    code, _, err = invoke("generate", "--run", run, "--n", "6", "--steps", "2", "--batch-size", "6")
    assert code == 0, err
    summary = json.loads((run / "synthetic" / "loft-l0.5-g2-s2" / "summary.json").read_text())
    assert summary["kept"] == 6 and not summary["stopped_by_guard"]
    assert summary["guard_rule"] == "relative" and summary["guard_ratio"] == 0.5 and summary["guard_distance"] == "ssim"


def test_a_stopped_pool_skips_its_cells_and_the_sweep_goes_on(invoke, texture_run, tmp_path, monkeypatch):
    """A guard that calls everything a copy stops LoFT's pool; classic's cells (unguarded copies) still run."""
    monkeypatch.setattr(stage, "MAX_REJECTED_IN_A_ROW", 3)
    run = shutil.copytree(texture_run, tmp_path / "run")
    code, out, err = invoke("sweep-ratio", "--run", run, "--ratios", "0,1", "--methods", "loft,classic",
                          "--model", "tiny-resnet18", "--seeds", "1", "--steps", "2", "--batch-size", "4",
                          "--generate-steps", "2", "--guard-threshold", "2.0", "--no-pretrained")
    assert code == 0, err
    assert "the guard stopped the pool" in out + err and "skipped" in out + err
    summary = json.loads((run / "sweep" / "summary.json").read_text())
    assert list(summary["skipped_cells"]) == ["loft-r1-tiny-resnet18-s0-f0"]
    assert "classic" in summary["models"]["tiny-resnet18"] and "loft" not in summary["models"]["tiny-resnet18"]
    assert "Skipped cells" in (run / "sweep" / "summary.md").read_text()

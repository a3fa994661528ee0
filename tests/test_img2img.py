"""`--method img2img` on the tiny model: diffusers' img2img pipeline equivalence, the source-aware guard, the
manifest, distance to the source against strength, folds."""
from __future__ import annotations

import pytest
import torch
from conftest import pool_manifest

from rareaug.generate.guard import Guard
from rareaug.models import load_base_model
from rareaug.split import fold_view, read_split

FAST = ("--steps", "10", "--batch-size", "4", "--no-guard")


@pytest.fixture
def run(loft_run):
    return loft_run


@pytest.mark.parametrize("scheduler", ["default", "heun", "dpm++"])  # the model's own, order 2, multistep
def test_batched_img2img_equals_diffusers_img2img_pipeline(scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    from rareaug.generate.sampler import BankSampler, SampleRequest, make_scheduler

    base = load_base_model("tiny")
    images = torch.rand((3, 3, 64, 64), generator=torch.Generator().manual_seed(5))
    pipe = StableDiffusionImg2ImgPipeline(**base.pipeline().components)
    pipe.scheduler = make_scheduler(scheduler, base.scheduler.config, base.sampling_scheduler)
    expected = pipe("a photo of a crack", image=images[1:2], strength=0.6, num_inference_steps=5, guidance_scale=2.0,
                    generator=[torch.Generator().manual_seed(1234)], output_type="pt").images

    sampler = BankSampler(base, None, "a photo of a crack", 2.0, 5, scheduler, torch.device("cpu"), 64)
    # The same image batched with two others that start from other images and seeds.
    ours = sampler.sample([SampleRequest([], [], [], 7), SampleRequest([], [], [], 1234), SampleRequest([], [], [], 9)],
                          images, 0.6)
    assert torch.allclose(ours[1], expected[0], atol=2e-4), (ours[1] - expected[0]).abs().max()
    assert not torch.allclose(ours[0], ours[1], atol=1e-2)


def test_the_guard_leaves_an_images_own_source_out_and_measures_it_apart():
    reals = torch.rand((6, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    guard = Guard(reals, [f"r{i}" for i in range(6)], leave_source_out=True)
    judged = guard.judge(reals[[2, 3]], sources=[2, 1])
    assert judged.source_distances[0] == pytest.approx(0, abs=1e-5)  # an exact copy of its own source
    assert judged.nearest_ids[0] != "r2" and judged.copies[0] is False  # not a copy of any other real image
    assert judged.nearest_ids[1] == "r3" and judged.copies[1] is True  # a copy of another real image still is
    assert guard.neighbours == 4 and "next 4" in guard.description
    assert Guard(reals, [f"r{i}" for i in range(6)]).judge(reals[[2]]).copies == [True]  # every real image counts
    alone = Guard(reals[:1], ["r0"], rule="absolute", threshold=0.1, leave_source_out=True).judge(reals[:1], [0])
    assert alone.nearest_ids == [""] and alone.copies == [False] and alone.source_distances[0] < 1e-5


def test_img2img_pool_records_source_strength_and_distance(invoke, run):
    code, out, err = invoke("generate", "--run", run, "--n", "8", "--method", "img2img", "--strength", "0.3", *FAST)
    assert code == 0, err
    folder = run / "synthetic" / "img2img-t0.3-g2-s10"
    rows = pool_manifest(folder)
    assert [r["kept"] for r in rows] == ["1"] * 8 and all(r["strength"] == "0.3" for r in rows)
    train = sorted(row.id for row in fold_view(read_split(run / "split.csv"), 1).rare_train)
    sources = [r["source_id"] for r in rows]
    assert sorted(sources[:len(train)]) == train and sources[len(train):] == sources[:8 - len(train)]  # round-robin
    assert all(r["loras"] == "" and r["source_distance"] and r["nearest_real_id"] != r["source_id"] for r in rows)
    # Asked again with another strength: a pool of its own, named by it.
    assert invoke("generate", "--run", run, "--n", "2", "--method", "img2img", "--strength", "0.9", *FAST)[0] == 0
    assert (run / "synthetic" / "img2img-t0.9-g2-s10" / "s000001.png").is_file()
    # The report shows each image beside its source; shared without real images, it shows neither.
    assert invoke("report", "--run", run)[0] == 0
    assert "the real image each one started from" in (run / "report.html").read_text()
    assert invoke("report", "--run", run, "--no-real-images")[0] == 0
    page = (run / "report.html").read_text()
    assert "started from" not in page and "img2img images carry the real images' pixels" in page


def test_distance_to_the_source_grows_with_strength_and_a_small_strength_stays_close():
    """On the shipped mini model and real pullovers (the tiny test model's random autoencoder loses any image)."""
    from rareaug.generate.sampler import BankSampler, SampleRequest
    from rareaug.images import model_input
    from rareaug.samples import fashion_root

    base = load_base_model("mini")
    paths = sorted((fashion_root() / "pullover").glob("*.png"))[:6]
    reals = torch.stack([model_input(path, 32, "center") for path in paths]) / 2 + 0.5
    guard = Guard(reals, [path.stem for path in paths], leave_source_out=True)
    sampler = BankSampler(base, None, "a photo of a pullover", 2.0, 10, "default", torch.device("cpu"), 32)
    requests = [SampleRequest([], [], [], seed) for seed in range(len(paths))]
    distances = {}
    for strength in (0.1, 0.5, 1.0):
        judged = guard.judge(sampler.sample(requests, reals, strength), sources=list(range(len(paths))))
        distances[strength] = sum(judged.source_distances) / len(paths)
        if strength == 0.1:  # each image far nearer its own source than any other (mini's autoencoder alone: 0.05-0.25)
            assert all(own < 0.6 * other for own, other in zip(judged.source_distances, judged.distances))
    assert distances[0.1] < distances[0.5] < distances[1.0], distances


def test_img2img_takes_only_its_folds_images_and_errors_are_one_line(invoke, folder_data, tmp_path):
    run = tmp_path / "run"  # img2img needs no fit: the split, and the base model named in a recipe
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("recipe: {resolution: 64}\nfit: {base_model: tiny}\n")
    code, _, err = invoke("inspect", "--data", folder_data, "--rare", "crack", "--run", run, "--folds", "2")
    assert code == 0, err
    code, _, err = invoke("generate", "--run", run, "--n", "4", "--method", "img2img", "--fold", "1", "--config",
                          recipe, *FAST)
    assert code == 0, err
    rows = pool_manifest(run / "synthetic" / "img2img-t0.5-g2-s10-f1")
    allowed = {row.id for row in fold_view(read_split(run / "split.csv"), 2, 1).rare_train}
    assert {r["source_id"] for r in rows} <= allowed
    code, _, err = invoke("generate", "--run", run, "--n", "2", "--method", "img2img", "--fold", "1", "--lora",
                          "datadream", "--config", recipe, *FAST)
    assert code != 0 and "datadream" in err and "rareaug fit" in err and "Traceback" not in err
    code, _, err = invoke("generate", "--run", run, "--n", "2", "--method", "img2img", "--fold", "1", "--strength",
                          "0.05", "--config", recipe, *FAST)
    assert code != 0 and "--strength" in err and "Traceback" not in err


def test_a_pool_recorded_before_an_option_existed_resumes_unless_the_option_is_changed(invoke, run):
    import yaml

    from rareaug.run_dir import _without_new_defaults

    assert invoke("generate", "--run", run, "--n", "2", "--method", "classic", *FAST)[0] == 0
    record = run / "stages" / "generate-classic.yaml"
    older = yaml.safe_load(record.read_text())
    del older["generate"]["strength"], older["generate"]["lora"], older["fit"]["semantic_boost"]
    record.write_text(yaml.safe_dump(older))  # as an earlier rareaug wrote it
    assert invoke("generate", "--run", run, "--n", "3", "--method", "classic", *FAST)[0] == 0
    # img2img's options are not part of another method's pool: a sweep's --strength leaves it as it is.
    assert invoke("generate", "--run", run, "--n", "3", "--method", "classic", "--strength", "0.7", *FAST)[0] == 0
    previous = {"fit": {"steps": 600}}
    assert _without_new_defaults({"fit": {"steps": 600, "semantic_boost": False}}, previous) == previous
    changed = {"fit": {"steps": 600, "semantic_boost": True}}  # boosting on: not what the earlier fit did
    assert _without_new_defaults(changed, previous) == changed

"""The mini model's training script: resume equals an uninterrupted run, an EMA that follows the weights, a budget
that sets the steps (and the schedule), and checkpoints that are never unpickled."""
from __future__ import annotations

import pickle

import pytest
import torch

from rareaug.checkpoint import load_checkpoint, save_checkpoint
from rareaug.errors import RareaugError
from rareaug.models.mini.train import RECIPES, Clock, Paused, Recipe, budget_steps, lr_factor, make_ema, train_loop

RECIPE = Recipe(clip_steps=1, clip_batch=1, vae_steps=1, vae_batch=1, unet_steps=12, unet_batch=8, warmup=3,
                checkpoint_every=5)


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GroupNorm(4, 16), torch.nn.SiLU(),
                                torch.nn.Linear(16, 6))
    data = torch.randn(64, 6)
    return model, data


def _run(work, clock, total=12, ema=True, lr=3e-2):
    """One training run of the shared loop, as every stage uses it (random batches and noise from its generator)."""
    model, data = _model_and_data()
    generator = torch.Generator().manual_seed(7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    average = make_ema(model.parameters(), RECIPE) if ema else None

    def step_fn(_):
        batch = data[torch.randint(len(data), (8,), generator=generator)]
        noise = torch.randn(batch.shape, generator=generator)
        return torch.nn.functional.mse_loss(model(batch + noise), batch)

    summary = train_loop("unet", work, {"unet": model}, optimizer, step_fn, total, RECIPE, generator, clock,
                         lambda record: None, ema=average, base_lr=lr)
    return model, average, summary


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_ends(tmp_path):
    whole, whole_ema, whole_summary = _run(tmp_path / "whole", Clock())
    pieces = tmp_path / "pieces"
    for _ in range(3):  # a deadline already past: every piece stops after one step and checkpoints
        with pytest.raises(Paused):
            _run(pieces, Clock(piece_deadline=0.0))
    assert load_checkpoint(pieces / "unet.checkpoint.safetensors")["step"] == 3
    resumed, resumed_ema, resumed_summary = _run(pieces, Clock())
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole_ema.shadow_params, resumed_ema.shadow_params):
        assert torch.equal(a, b)
    assert whole_ema.optimization_step == resumed_ema.optimization_step == 12
    assert whole_summary == resumed_summary


def test_the_ema_of_a_short_run_follows_the_weights_not_the_initial_ones(tmp_path):
    initial = [p.detach().clone() for p in _model_and_data()[0].parameters()]
    model, average, _ = _run(tmp_path, Clock(), total=40)

    def distance(xs, ys):
        return sum((x - y).pow(2).sum() for x, y in zip(xs, ys)).sqrt().item()

    raw = [p.detach() for p in model.parameters()]
    to_raw, to_initial = distance(average.shadow_params, raw), distance(average.shadow_params, initial)
    # torch.optim.swa_utils with a fixed 0.999 from step 1 kept ~96% of the initial weights after 40 steps.
    assert to_raw < 0.3 * to_initial, (to_raw, to_initial)


def test_a_budget_sets_the_step_count_and_the_schedule_ends_at_it():
    recipe = RECIPES["cpu"]
    assert budget_steps(0.5, 600, recipe) == 1200  # ten minutes at 0.5 s a step
    assert budget_steps(0.5, 10 ** 6, recipe) == recipe.unet_steps  # never past the recipe
    assert budget_steps(10.0, 1, recipe) == recipe.warmup + 1  # never inside the warm-up
    assert lr_factor(1199, recipe.warmup, 1200) < 1e-5 and lr_factor(recipe.warmup, recipe.warmup, 1200) == 1.0


def test_the_loop_follows_a_budget_that_resizes_it(tmp_path):
    model, data = _model_and_data()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def step_fn(step):
        seen.append(optimizer.param_groups[0]["lr"])
        return model(data[:4]).pow(2).mean()

    summary = train_loop("unet", tmp_path, {"unet": model}, optimizer, step_fn, 100, RECIPE, generator, Clock(),
                         lambda record: None, base_lr=0.1, budget=lambda step, seconds, timed: 8 if step == 4 else None)
    assert summary["steps"] == 8 and len(seen) == 8
    assert seen[-1] == pytest.approx(0.1 * lr_factor(7, RECIPE.warmup, 8))


def test_checkpoints_round_trip_optimizer_state_without_pickle(tmp_path):
    model, data = _model_and_data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(data).pow(2).mean().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "generator": torch.Generator().manual_seed(3).get_state(),
             "step": 5, "name": "x", "none": None, "nested": [1.5, {"a": torch.ones(2)}]}
    save_checkpoint(tmp_path / "c.safetensors", state)
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    optimizer.load_state_dict(loaded["optimizer"])  # what a resume does
    assert loaded["step"] == 5 and loaded["name"] == "x" and loaded["none"] is None
    assert torch.equal(loaded["nested"][1]["a"], torch.ones(2))
    assert torch.equal(loaded["generator"], state["generator"])
    first = next(iter(loaded["optimizer"]["state"].values()))
    assert torch.equal(first["exp_avg"], next(iter(state["optimizer"]["state"].values()))["exp_avg"])


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_a_planted_pickle_checkpoint_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "unet.checkpoint.safetensors"
    path.write_bytes(pickle.dumps({"step": _Payload()}))
    with pytest.raises(RareaugError, match="not a rareaug checkpoint") as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "PWNED").exists()
    torch.save({"step": 1}, path)  # torch's own format is refused the same way
    with pytest.raises(RareaugError, match="never loaded"):
        load_checkpoint(path)

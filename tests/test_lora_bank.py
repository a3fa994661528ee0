"""The LoRA bank is an optimisation, never a change of method: it matches diffusers and peft."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers.optimization import get_scheduler
from peft import LoraConfig

from rareaug.config import FitConfig
from rareaug.lora.bank import DEFAULT_TARGETS, LoRABank
from rareaug.lora.files import to_diffusers_state
from rareaug.lora.train import Job, JobRunner, TrainData, checkpoint_path, draw_training_sample, unit_generator
from rareaug.models import build_tiny_components

SEED = 7
IDS = ["r0001", "r0002", "r0003"]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components(seed=0)


def unet_inputs(tiny, batch: int):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, 8, 8, generator=generator)
    embeds = torch.randn(batch, 77, 32, generator=generator)
    return sample, torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)), embeds


def random_factors(bank: LoRABank, slot: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.lora_A[slot] = torch.randn(layer.lora_A.shape[1:], generator=generator) * 0.3
            layer.lora_B[slot] = torch.randn(layer.lora_B.shape[1:], generator=generator) * 0.3


def pipeline_with(tiny, unet):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=tiny["vae"], text_encoder=tiny["text_encoder"], tokenizer=tiny["tokenizer"],
                                   unet=unet, scheduler=tiny["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("rank,alpha", [(2, 2.0), (4, 8.0)])
def test_bank_mix_equals_diffusers_set_adapters(tiny, tmp_path, rank, alpha):
    bank_unet = copy.deepcopy(tiny["unet"])
    bank = LoRABank(bank_unet, n_a=2, rank=rank, alpha=alpha)
    random_factors(bank, 0, 1)
    random_factors(bank, 1, 2)
    for slot, name in enumerate("ab"):
        from safetensors.torch import save_file

        save_file(to_diffusers_state(bank.get_slot(slot), alpha / rank), tmp_path / f"{name}.safetensors")

    pipe = pipeline_with(tiny, copy.deepcopy(tiny["unet"]))
    pipe.load_lora_weights(tmp_path / "a.safetensors", adapter_name="a")
    pipe.load_lora_weights(tmp_path / "b.safetensors", adapter_name="b")
    sample, timesteps, embeds = unet_inputs(tiny, 2)
    with torch.no_grad():
        pipe.set_adapters(["a", "b"], [0.3, 0.7])
        reference = pipe.unet(sample, timesteps, embeds).sample
        with bank.route([[0, 1], [0, 1]], weights=[[0.3, 0.7], [0.3, 0.7]]):
            ours = bank_unet(sample, timesteps, embeds).sample
        assert torch.allclose(ours, reference, atol=5e-5), (ours - reference).abs().max()

        # Each sample its own mix in one pass: sample 0 adapter a alone, sample 1 adapter b alone.
        # (Same batch size on both sides: CPU kernels differ by ~1e-4 between batch 1 and batch 2.)
        pipe.set_adapters(["a"], [1.0])
        only_a = pipe.unet(sample, timesteps, embeds).sample[:1]
        pipe.set_adapters(["b"], [1.0])
        only_b = pipe.unet(sample, timesteps, embeds).sample[1:]
        with bank.route([[0], [1]]):
            both = bank_unet(sample, timesteps, embeds).sample
        assert torch.allclose(both, torch.cat([only_a, only_b]), atol=5e-5)
        # No routing: the base model, untouched.
        plain = tiny["unet"](sample, timesteps, embeds).sample
        assert torch.allclose(bank_unet(sample, timesteps, embeds).sample, plain, atol=1e-6)
        assert not torch.allclose(both, plain, atol=1e-3)


def train_data(tiny, n: int) -> TrainData:
    generator = torch.Generator().manual_seed(3)
    posteriors = torch.cat([torch.randn(n, 4, 8, 8, generator=generator),
                            torch.full((n, 4, 8, 8), -3.0)], dim=1)
    embeds = torch.randn(n, 77, 32, generator=generator)
    return TrainData(IDS[:n], posteriors, embeds, 0.18215)


def fit_config(steps: int = 4, **changes) -> FitConfig:
    values = dict(method="loft", steps=steps, rank=2, alpha=2.0, lr=1e-2, samples_per_step=1, warmup_steps=1,
                  checkpoint_every=1000)
    values.update(changes)
    return FitConfig(**values)


def train_with_bank(tiny, data: TrainData, config: FitConfig, chunks: list[list[int]], tmp_path) -> dict:
    """Train the adapters in the given chunks; returns {id: factors}."""
    unet = copy.deepcopy(tiny["unet"])
    size = max(len(chunk) for chunk in chunks)
    bank = LoRABank(unet, n_a=size, rank=config.rank, alpha=config.alpha)
    runner = JobRunner(unet, bank, tiny["scheduler"], data, config, SEED, torch.device("cpu"), size, tmp_path)
    result = {}
    for chunk in chunks:
        ids = [data.ids[i] for i in chunk]
        runner.run(Job("loft", "-".join(ids), ids, chunk))
        for slot, image_id in enumerate(ids):
            result[image_id] = bank.get_slot(slot)
    return result


def train_alone_with_peft(tiny, data: TrainData, config: FitConfig, row: int) -> dict:
    """The reference: one peft adapter, batch 1, torch AdamW + clip_grad_norm_ + diffusers cosine."""
    unet = copy.deepcopy(tiny["unet"])
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(DEFAULT_TARGETS),
                                init_lora_weights=True))
    image_id = data.ids[row]
    # Same initial A as the bank draws for this image (B starts at zero in both).
    probe = LoRABank(copy.deepcopy(tiny["unet"]), n_a=1, rank=config.rank, alpha=config.alpha)
    probe.init_a(0, unit_generator(SEED, f"init:{image_id}"))
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, layer in probe.layers.items():
            modules[name].lora_A["default"].weight.copy_(layer.lora_A[0])
            modules[name].lora_B["default"].weight.zero_()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps)
    generator = unit_generator(SEED, f"train:{image_id}")
    for _ in range(config.steps):
        noisy, target, timestep = draw_training_sample(data.posteriors[row], generator, tiny["scheduler"],
                                                       data.scaling_factor)
        prediction = unet(noisy, timestep, data.embeds[row:row + 1]).sample
        loss = torch.nn.functional.mse_loss(prediction, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return {f"{name}.{part}": modules[name].__getattr__(f"lora_{part}")["default"].weight.detach().clone()
            for name in probe.layers for part in "AB"}


def assert_same_factors(left: dict, right: dict, atol: float) -> None:
    assert left.keys() == right.keys()
    worst = max((left[k] - right[k]).abs().max().item() for k in left)
    assert worst <= atol, f"max difference {worst}"


def in_float64(tiny: dict, data: TrainData) -> tuple[dict, TrainData]:
    """float64 on both sides: Adam divides by sqrt(v), so the tiny A gradients of the first steps turn
    float32 rounding (which differs between CPUs) into ~3e-5 factor differences; float64 leaves the algorithm."""
    return ({**tiny, "unet": copy.deepcopy(tiny["unet"]).double()},
            TrainData(data.ids, data.posteriors.double(), data.embeds.double(), data.scaling_factor))


def test_bank_training_equals_each_adapter_trained_alone_with_peft(tiny, tmp_path):
    tiny, data = in_float64(tiny, train_data(tiny, 3))
    config = fit_config(steps=4, max_grad_norm=0.05)  # small max norm: clipping is active and per adapter
    together = train_with_bank(tiny, data, config, [[0, 1, 2]], tmp_path)
    for row, image_id in enumerate(data.ids):
        alone = train_alone_with_peft(tiny, data, config, row)
        assert next(iter(alone.values())).dtype == torch.float64
        assert_same_factors(together[image_id], alone, atol=1e-10)
        assert together[image_id][next(k for k in alone if k.endswith(".B"))].abs().max() > 0  # it trained


def test_adapter_result_does_not_depend_on_its_neighbours_or_chunk_size(tiny, tmp_path):
    data = train_data(tiny, 3)
    config = fit_config(steps=3)
    one_chunk = train_with_bank(tiny, data, config, [[0, 1, 2]], tmp_path / "a")
    singles = train_with_bank(tiny, data, config, [[0], [1], [2]], tmp_path / "b")
    other_pairing = train_with_bank(tiny, data, config, [[2, 0], [1]], tmp_path / "c")
    for image_id in data.ids:
        assert_same_factors(one_chunk[image_id], singles[image_id], atol=2e-5)
        assert_same_factors(one_chunk[image_id], other_pairing[image_id], atol=2e-5)


def test_class_methods_train_one_class_model(tiny, tmp_path):
    data = train_data(tiny, 3)
    for method, n_b in (("datadream", 1), ("chimera", 3)):
        config = fit_config(method=method, steps=3, samples_per_step=4, lr_a=1e-3)
        unet = copy.deepcopy(tiny["unet"])
        bank = LoRABank(unet, n_a=1, n_b=n_b, rank=2, alpha=2.0)
        runner = JobRunner(unet, bank, tiny["scheduler"], data, config, SEED, torch.device("cpu"), 2, tmp_path / method)
        losses = runner.run(Job(method, method, ["gravel"], [0, 1, 2]))
        assert sum(len(v) for v in losses.values()) == 3 * 4  # 4 images per step, micro-batches of 2
        b = torch.stack([layer.lora_B.detach() for layer in bank.layers.values()][:1])[0]
        assert (b.flatten(1).abs().sum(dim=1) > 0).all()  # every head (or the class LoRA) learned


def boosted_data(tiny) -> TrainData:
    """train_data(3) plus two boosted views of each image but the last, which has none (no mask)."""
    data = train_data(tiny, 3)
    generator = torch.Generator().manual_seed(5)
    views = torch.cat([torch.randn(4, 4, 8, 8, generator=generator), torch.full((4, 4, 8, 8), -3.0)], dim=1)
    return dataclasses.replace(data, boosted=views, boosted_rows=torch.tensor([0, 0, 1, 1]))


def train_chimera(tiny, data: TrainData, folder, batch_size: int = 4, on_step=None, **changes) -> dict:
    """One chimera job on all of `data`'s images; returns its factors, {"<layer>.A": (1, r, in), ".B": (n, out, r)}."""
    config = fit_config(**{**dict(method="chimera", steps=1, samples_per_step=3, lr_a=1e-2, warmup_steps=0,
                                  semantic_boost=True), **changes})
    unet = copy.deepcopy(tiny["unet"])
    bank = LoRABank(unet, n_a=1, n_b=len(data.ids), rank=2, alpha=2.0)
    folder.mkdir(parents=True, exist_ok=True)
    JobRunner(unet, bank, tiny["scheduler"], data, config, SEED, torch.device("cpu"), batch_size, folder,
              on_step=on_step).run(Job("chimera", "chimera-gravel", ["gravel"], [0, 1, 2]))
    return {f"{name}.{part}": getattr(layer, f"lora_{part}").detach().clone()
            for name, layer in bank.layers.items() for part in "AB"}


def test_semantic_boost_teaches_the_shared_a_only(tiny, tmp_path):
    data = boosted_data(tiny)
    # A frozen (lr 0) and no clipping: the views could reach the heads only through their own gradients,
    # which are dropped, so the heads train exactly as without boosting.
    frozen = dict(lr_a=0.0, max_grad_norm=1e9)
    on = train_chimera(tiny, data, tmp_path / "frozen-on", **frozen)
    off = train_chimera(tiny, data, tmp_path / "frozen-off", semantic_boost=False, **frozen)
    assert all(torch.equal(on[key], off[key]) for key in on)
    # A learning (from step 2: while every B is zero, A gets no gradient): the views change the shared A.
    on = train_chimera(tiny, data, tmp_path / "on", steps=2)
    off = train_chimera(tiny, data, tmp_path / "off", steps=2, semantic_boost=False)
    a_keys = [key for key in on if key.endswith(".A")]
    assert max((on[key] - off[key]).abs().max().item() for key in a_keys) > 1e-4
    # Without views (no masks) boosting falls back to training as without it, bit for bit.
    plain = dataclasses.replace(data, boosted=None, boosted_rows=None)
    fallback = train_chimera(tiny, plain, tmp_path / "plain", steps=2)
    assert all(torch.equal(value, off[key]) for key, value in fallback.items())
    # Micro-batches of one sample: the same result (in float64, see in_float64).
    tiny64, data64 = in_float64(tiny, data)
    data64 = dataclasses.replace(data64, boosted=data.boosted.double(), boosted_rows=data.boosted_rows)
    assert_same_factors(train_chimera(tiny64, data64, tmp_path / "batch-1", steps=2, batch_size=1),
                        train_chimera(tiny64, data64, tmp_path / "batch-4", steps=2, batch_size=4), atol=1e-10)


def test_semantic_boost_resumes_to_the_same_weights(tiny, tmp_path):
    data = boosted_data(tiny)
    # Two images a step from three: the epoch queue, and both generators, carry over the checkpoint.
    run = dict(steps=3, samples_per_step=2, checkpoint_every=1)
    straight = train_chimera(tiny, data, tmp_path / "straight", **run)

    def interrupt(job, step, adapter_steps):
        if step == 2:  # after the checkpoint of step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_chimera(tiny, data, tmp_path / "resumed", on_step=interrupt, **run)
    assert checkpoint_path(tmp_path / "resumed", "chimera-gravel").exists()
    resumed = train_chimera(tiny, data, tmp_path / "resumed", **run)
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)


def test_overfitting_one_image_drives_its_loss_down(tiny, tmp_path):
    """Measured on a fixed set of noise/timestep draws, so the comparison is not luck of the draw."""
    from rareaug.images import model_input
    from rareaug.samples import sample_root

    pixels = model_input(sample_root() / "gravel" / "gravel_00.png", 64, "center")
    with torch.no_grad():
        posterior = tiny["vae"].encode(pixels[None]).latent_dist.parameters
        embeds = tiny["text_encoder"](tiny["tokenizer"]("a photo of a gravel", padding="max_length",
                                                          max_length=77, return_tensors="pt").input_ids)[0]
    data = TrainData(["r0001"], posterior, embeds, 0.18215)
    config = fit_config(steps=120, rank=8, alpha=8.0, lr=2e-2, warmup_steps=0)
    unet = copy.deepcopy(tiny["unet"])
    bank = LoRABank(unet, n_a=1, rank=8, alpha=8.0)

    def held_out_loss() -> float:
        generator = torch.Generator().manual_seed(123)
        total = 0.0
        with torch.no_grad(), bank.route([0]):
            for _ in range(32):
                noisy, target, timestep = draw_training_sample(posterior[0], generator, tiny["scheduler"], 0.18215)
                total += torch.nn.functional.mse_loss(unet(noisy, timestep, embeds).sample, target).item()
        return total / 32

    JobRunner(unet, bank, tiny["scheduler"], data, config, SEED, torch.device("cpu"), 1, tmp_path).run(
        Job("loft", "one", ["r0001"], [0]))
    trained = held_out_loss()
    bank.zero_b()  # B = 0: the base model alone
    untrained = held_out_loss()
    assert trained < 0.85 * untrained, (untrained, trained)

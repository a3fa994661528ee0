"""Training LoRAs in the bank, exactly as each would train alone.

LoFT: a job is a chunk of per-image adapters, one sample each per UNet pass; the loss is the sum of the
samples' own mean squared errors, so adapter i's gradient is the one it would get alone; AdamW is
elementwise, so stacked parameters keep per-adapter optimizer state; gradients are clipped per adapter.
Every random draw (init, posterior sample, noise, timestep) comes from the adapter's own generator,
seeded by (seed, image id), so its result does not depend on its neighbours or the chunk size.

DataDream / ChimeraLoRA: a job is one class; several images per optimizer step, mean loss, one clip.

ChimeraLoRA's semantic boosting: when the images have boosted views (random crops that keep the mask's box
whole, `TrainData.boosted`), each step first runs one view of every sample's image through (A, the image's
own head), with the same per-sample weight, and drops what that gave the B heads: only the shared A learns
from the views, then A and B learn from the standard samples as without boosting. The views are drawn by a
second generator of the job, so the standard samples are the same draws as without boosting; images
without views add nothing, and a job none of whose images has one trains exactly as without boosting.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import FitConfig
from ..device import amp_context, amp_settings
from .bank import LoRABank


def unit_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator per (seed, key): the same draws on any device and in any batch."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclasses.dataclass
class TrainData:
    """Pre-computed once per run: VAE posterior parameters and the prompt embedding of each image."""

    ids: list[str]
    posteriors: torch.Tensor  # (N, 2*C, h, w): mean and log-variance, as the VAE returns them
    embeds: torch.Tensor  # (N, tokens, dim)
    scaling_factor: float
    token_ids: torch.Tensor | None = None  # (N, tokens): the prompt, for a text-encoder LoRA (DataDream)
    boosted: torch.Tensor | None = None  # (M, 2*C, h, w): Chimera's boosted views (posteriors), images with masks
    boosted_rows: torch.Tensor | None = None  # (M,): the row of the image each view was cut from

    def views(self) -> dict[int, list[int]]:
        """The boosted views of each image row that has any."""
        by_row: dict[int, list[int]] = {}
        for view, row in enumerate([] if self.boosted_rows is None else self.boosted_rows.tolist()):
            by_row.setdefault(row, []).append(view)
        return by_row


@dataclasses.dataclass
class Job:
    """One optimisation run in one bank. LoFT: a chunk of image adapters; DataDream/Chimera: one class."""

    method: str
    key: str  # names the checkpoint file
    units: list[str]  # what gets saved: image ids (LoFT) or the class name
    images: list[int]  # rows of TrainData the job trains on


def draw_training_sample(posterior: torch.Tensor, generator: torch.Generator, scheduler, scaling: float):
    """One sample's noisy latent, target and timestep, in the same order of draws as the reference
    (diffusers' train_text_to_image_lora: posterior sample, noise, timestep)."""
    latent = DiagonalGaussianDistribution(posterior[None]).sample(generator) * scaling
    noise = torch.randn(latent.shape, generator=generator, dtype=latent.dtype).to(latent.device)
    timestep = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator).to(latent.device)
    noisy = scheduler.add_noise(latent, noise, timestep)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latent, noise, timestep)
    else:
        target = noise
    return noisy, target, timestep


CHECKPOINT_SUFFIX = ".ckpt.safetensors"


def checkpoint_path(folder: Path, key: str) -> Path:
    """A job's resume state: safetensors + JSON (rareaug.checkpoint), never a pickle, so a file planted in a
    run directory cannot run code when `fit` resumes. (Older runs' `.pt` pickles are ignored, never read.)"""
    return folder / f"{key}{CHECKPOINT_SUFFIX}"


class JobRunner:
    """Runs jobs on one UNet + bank; checkpoints atomically and resumes to the same final weights."""

    def __init__(self, unet, bank: LoRABank, scheduler, data: TrainData, fit: FitConfig, seed: int,
                 device: torch.device, batch_size: int, checkpoint_dir: Path,
                 on_step: Callable[[Job, int, int], None] | None = None,
                 text_encoder=None, text_bank: LoRABank | None = None):
        self.unet, self.bank, self.scheduler, self.data = unet, bank, scheduler, data
        # DataDream's optional text-encoder LoRA: one slot, trained with the UNet's, same learning rate.
        self.text_encoder, self.text_bank = text_encoder, text_bank
        self.fit, self.seed, self.device, self.batch_size = fit, seed, device, batch_size
        self.checkpoint_dir, self.on_step = checkpoint_dir, on_step
        self.amp_dtype, self.use_scaler = amp_settings(device)
        self.views = data.views() if fit.semantic_boost else {}

    # --- the job ----------------------------------------------------------------------------------

    def run(self, job: Job) -> dict[str, list[float]]:
        """Train the job to `fit.steps` optimizer steps; returns the loss history of each unit."""
        generators = self._generators(job)
        self._init_bank(job)
        optimizer = self._optimizer(job)
        lr_schedule = get_scheduler("cosine", optimizer, num_warmup_steps=self.fit.warmup_steps,
                                    num_training_steps=self.fit.steps)
        scaler = torch.amp.GradScaler("cuda") if self.use_scaler else None
        state = {"step": 0, "losses": {unit: [] for unit in self._loss_keys(job)}, "queue": []}
        checkpoint = checkpoint_path(self.checkpoint_dir, job.key)
        if checkpoint.exists():
            state = self._restore(checkpoint, job, optimizer, lr_schedule, scaler, generators)

        while state["step"] < self.fit.steps:
            self._step(job, generators, optimizer, scaler, state)
            lr_schedule.step()
            state["step"] += 1
            if state["step"] % self.fit.checkpoint_every == 0 and state["step"] < self.fit.steps:
                self._save(checkpoint, job, optimizer, lr_schedule, scaler, generators, state)
            if self.on_step:
                self.on_step(job, state["step"], len(job.units) if job.method == "loft" else 1)
        return state["losses"]

    def _loss_keys(self, job: Job) -> list[str]:
        return job.units if job.method == "loft" else [self.data.ids[i] for i in job.images]

    def _generators(self, job: Job) -> list[torch.Generator]:
        generators = [unit_generator(self.seed, f"train:{unit}") for unit in job.units]
        if self._boosts(job):  # the views' draws, apart from the standard samples' so those stay as unboosted
            generators.append(unit_generator(self.seed, f"boost:{job.units[0]}"))
        return generators

    def _boosts(self, job: Job) -> bool:
        return job.method == "chimera" and any(row in self.views for row in job.images)

    def _init_bank(self, job: Job) -> None:
        bank = self.bank
        bank.zero_b()
        if self.text_bank is not None:
            self.text_bank.zero_b()
            self.text_bank.init_a(0, unit_generator(self.seed, f"init-text:{job.units[0]}"), kind="kaiming")
        if job.method == "chimera":
            bank.init_a(0, unit_generator(self.seed, f"init:{job.units[0]}"), kind="gaussian")
            return
        for slot, unit in enumerate(job.units):
            bank.init_a(slot, unit_generator(self.seed, f"init:{unit}"), kind="kaiming")

    def _optimizer(self, job: Job) -> torch.optim.Optimizer:
        fit = self.fit
        groups = [{"params": self.bank.b_parameters(), "lr": fit.lr}]
        groups.append({"params": self.bank.a_parameters(), "lr": fit.lr_a if job.method == "chimera" else fit.lr})
        if self.text_bank is not None:
            groups.append({"params": self.text_bank.parameters(), "lr": fit.lr})
        return torch.optim.AdamW(groups, lr=fit.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=fit.weight_decay)

    # --- one optimizer step -----------------------------------------------------------------------

    def _samples(self, job: Job, generators, state) -> list[tuple[int, int, int, torch.Generator, str]]:
        """(a slot, b slot, image row, generator, loss key) for every sample of this step."""
        if job.method == "loft":
            return [(slot, slot, row, generators[slot], unit)
                    for slot, (unit, row) in enumerate(zip(job.units, job.images))]
        generator, queue = generators[0], state["queue"]
        while len(queue) < self.fit.samples_per_step:  # epochs of seeded permutations, as a DataLoader would
            queue.extend(torch.randperm(len(job.images), generator=generator).tolist())
        picks, state["queue"] = queue[:self.fit.samples_per_step], queue[self.fit.samples_per_step:]
        head = (lambda position: position) if job.method == "chimera" else (lambda position: 0)
        return [(0, head(p), job.images[p], generator, self.data.ids[job.images[p]]) for p in picks]

    def _boosted_samples(self, job: Job, generators, samples) -> list[tuple[int, int, int, torch.Generator, str]]:
        """Semantic boosting: one of its image's views (a boosted-view index in place of the image row's
        posterior) for every sample whose image has views, drawn from the job's boost generator."""
        if not self._boosts(job):
            return []
        generator, boosted = generators[-1], []
        for a_slot, b_slot, row, _, key in samples:
            views = self.views.get(row)
            if views:
                boosted.append((a_slot, b_slot, views[int(torch.randint(len(views), (1,), generator=generator))],
                                generator, key))
        return boosted

    def _step(self, job: Job, generators, optimizer, scaler, state) -> None:
        samples = self._samples(job, generators, state)
        # LoFT sums per-sample losses (each adapter's own loss); the class methods average over the step.
        weight = 1.0 if job.method == "loft" else 1.0 / len(samples)
        boosted = self._boosted_samples(job, generators, samples)
        if boosted:  # Chimera: the shared A learns from the views; what they give the heads is dropped
            drawn = [draw_training_sample(self.data.boosted[view], gen, self.scheduler, self.data.scaling_factor)
                     for _, _, view, gen, _ in boosted]
            rows = [int(self.data.boosted_rows[view]) for _, _, view, _, _ in boosted]
            self._backward(boosted, drawn, rows, weight, scaler)
            for parameter in self.bank.b_parameters():
                parameter.grad = None
        drawn = [draw_training_sample(self.data.posteriors[row], gen, self.scheduler, self.data.scaling_factor)
                 for _, _, row, gen, _ in samples]
        per_sample = self._backward(samples, drawn, [row for _, _, row, _, _ in samples], weight, scaler)
        for (_, _, _, _, key), value in zip(samples, per_sample):
            state["losses"][key].append(value)
        if scaler:
            scaler.unscale_(optimizer)
        self._clip(job)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _backward(self, samples, drawn, rows: list[int], weight: float, scaler) -> list[float]:
        """Accumulate the gradients of `weight` x the samples' summed losses, batch_size samples per UNet pass;
        `rows` names each sample's image (its prompt). Returns the per-sample losses."""
        losses = []
        for start in range(0, len(samples), self.batch_size):
            part = slice(start, start + self.batch_size)
            # Routing stays set through backward: gradient checkpointing re-runs the forward there.
            with self.bank.route([s[0] for s in samples[part]], [s[1] for s in samples[part]]):
                per_sample = self._forward(drawn[part], rows[part])
                loss = per_sample.sum() * weight
                (scaler.scale(loss) if scaler else loss).backward()
            losses += per_sample.detach().cpu().tolist()
        return losses

    def _forward(self, drawn, rows: list[int]) -> torch.Tensor:
        noisy = torch.cat([d[0] for d in drawn]).to(self.device)
        target = torch.cat([d[1] for d in drawn]).to(self.device)
        timesteps = torch.cat([d[2] for d in drawn]).to(self.device)
        with amp_context(self.amp_dtype):
            embeds = self._embeds(rows)
            prediction = self.unet(noisy.to(self.unet.dtype), timesteps, embeds.to(self.unet.dtype)).sample
        dtype = torch.promote_types(prediction.dtype, torch.float32)  # float32 at least; float64 stays float64
        return F.mse_loss(prediction.to(dtype), target.to(dtype), reduction="none").mean(dim=(1, 2, 3))

    def _embeds(self, rows: list[int]) -> torch.Tensor:
        if self.text_bank is None:
            return self.data.embeds[rows].to(self.device)
        with self.text_bank.route([0] * len(rows)):
            return self.text_encoder(self.data.token_ids[rows].to(self.device))[0]

    def _all_parameters(self) -> list[torch.nn.Parameter]:
        return self.bank.parameters() + (self.text_bank.parameters() if self.text_bank is not None else [])

    def _clip(self, job: Job) -> None:
        """torch's clip_grad_norm_ rule (coef = max / (norm + 1e-6), at most 1), per adapter for LoFT."""
        params = [p for p in self._all_parameters() if p.grad is not None]
        max_norm = self.fit.max_grad_norm
        if job.method != "loft":
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return
        squares = sum(p.grad.to(torch.promote_types(p.grad.dtype, torch.float32)).pow(2).flatten(1).sum(dim=1)
                      for p in params)  # (slots,)
        coef = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.view(-1, *([1] * (p.grad.ndim - 1))).to(p.grad.dtype))

    # --- checkpoints -------------------------------------------------------------------------------

    def _save(self, path: Path, job: Job, optimizer, lr_schedule, scaler, generators, state) -> None:
        content = {
            "key": job.key, "units": job.units, "state": state, "slots": (self.bank.n_a, self.bank.n_b),
            "bank": _factors(self.bank), "text_bank": _factors(self.text_bank),
            "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "generators": [g.get_state() for g in generators],
        }
        save_checkpoint(path, content)

    def _restore(self, path: Path, job: Job, optimizer, lr_schedule, scaler, generators) -> dict:
        content = load_checkpoint(path)
        if (content["key"] != job.key or content["units"] != job.units
                or tuple(content.get("slots", ())) != (self.bank.n_a, self.bank.n_b)  # another bank size: start over
                or len(content["generators"]) != len(generators)):  # semantic boosting turned on or off: likewise
            return {"step": 0, "losses": {unit: [] for unit in self._loss_keys(job)}, "queue": []}
        _load_factors(self.bank, content["bank"])
        _load_factors(self.text_bank, content["text_bank"])
        optimizer.load_state_dict(content["optimizer"])
        lr_schedule.load_state_dict(content["lr_schedule"])
        if scaler and content["scaler"]:
            scaler.load_state_dict(content["scaler"])
        for generator, saved in zip(generators, content["generators"]):
            generator.set_state(saved)
        return content["state"]


def _factors(bank: LoRABank | None) -> dict:
    if bank is None:
        return {}
    return {name: (layer.lora_A.detach().cpu(), layer.lora_B.detach().cpu()) for name, layer in bank.layers.items()}


@torch.no_grad()
def _load_factors(bank: LoRABank | None, factors: dict) -> None:
    for name, (a, b) in factors.items():
        bank.layers[name].lora_A.copy_(a)
        bank.layers[name].lora_B.copy_(b)

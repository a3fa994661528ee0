"""Train `rareaug-mini` from scratch on Fashion-MNIST; write weights, model card and sample grid.

    python -m rareaug.models.mini.train --out rareaug/models/mini/weights --recipe gpu   # an H100/H200, ~10 min
    python -m rareaug.models.mini.train --out /tmp/mini --recipe cpu                     # 2 CPU cores, in the \
background

Three stages, as Stable Diffusion was made from parts trained apart:
1. a small CLIP (image tower + text tower, contrastive) on real images of all ten classes with a few caption
   templates per class name; it knows the four rare garments by name and sight, as SD's CLIP has seen chest
   X-rays that SD cannot draw;
2. a KL autoencoder on real images of all ten classes (SD's autoencoder is a general-purpose image codec too);
3. the UNet on the six common classes only, conditioned on the frozen CLIP text tower (epsilon prediction,
   SD's noise schedule, 10% empty prompts for classifier-free guidance), with an EMA that warms up
   (diffusers' EMAModel) so the shipped weights never keep the random initialisation.
The UNet never sees a pullover, dress, coat or shirt.

Every stage checkpoints into `--work` (safetensors + JSON, no pickle) and resumes where it stopped: rerun the
same command. `--piece-minutes M` stops cleanly after M minutes (a GPU lent in 10-minute pieces);
`--max-minutes M` sizes the UNet stage to M minutes, measured on its first steps, and the learning-rate
schedule to that many steps. Same seed and recipe on the same device kind: same weights, resumed or not.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...checkpoint import load_checkpoint, save_checkpoint
from ...device import bf16_autocast, device_label
from ...errors import RareaugError
from ...io import atomic_write_json, read_json
from ...samples.fashion_mnist import CLASSES, COMMON_CLASSES, RARE_CLASSES, class_index, load_fashion_mnist
from ..tiny import clip_tokenizer, sd_ddpm_scheduler
from . import CAPTION_TEMPLATES, COMPONENTS, PROMPT, RESOLUTION, build_untrained, text_tower_of


@dataclasses.dataclass(frozen=True)
class Recipe:
    clip_steps: int
    clip_batch: int
    vae_steps: int
    vae_batch: int
    unet_steps: int
    unet_batch: int
    clip_lr: float = 1e-3
    vae_lr: float = 2e-3
    unet_lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.9995  # the cap; diffusers' warm-up schedule 1 - (1 + step) ** -2/3 rises to it
    kl_weight: float = 1e-6
    uncond_prob: float = 0.1
    images_per_class: int | None = None  # None: all 6,000
    checkpoint_every: int = 200


RECIPES = {
    # An H100/H200: about 15 minutes by the last run's 0.1 s a UNet step at batch 512 (launch-bound); run it in
    # pieces with --piece-minutes 9 where a GPU is lent 10 minutes at a time.
    "gpu": Recipe(clip_steps=2000, clip_batch=512, vae_steps=3000, vae_batch=256, unet_steps=6000, unet_batch=512),
    # Sized by step times measured on these 2 cores (0.5 s a CLIP step at 256, 1.0 s an autoencoder step at 128,
    # 0.76 s a UNet step at 128): about 95 minutes when nothing else runs.
    "cpu": Recipe(clip_steps=600, clip_batch=256, vae_steps=2000, vae_batch=128, unet_steps=4000, unet_batch=128),
    "smoke": Recipe(clip_steps=4, clip_batch=16, vae_steps=4, vae_batch=8, unet_steps=6, unet_batch=8, warmup=2,
                    images_per_class=8, checkpoint_every=2),
}


class Paused(Exception):
    """--piece-minutes ran out: the state is checkpointed and the same command continues it."""


# ---------------------------------------------------------------------------------------------------- data

def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 28x28 -> float 3x32x32 in [-1, 1], padded with Fashion-MNIST's own black background."""
    x = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return torch.from_numpy(x).float().div(127.5).sub(1).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def class_images(split: str, classes: tuple[str, ...], per_class: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images of `classes` in [-1, 1] and their index in `classes`."""
    images, labels = load_fashion_mnist(split)
    xs, ys = [], []
    for k, name in enumerate(classes):
        picked = images[labels == class_index(name)][:per_class]
        xs.append(picked)
        ys.append(np.full(len(picked), k))
    return to_model_range(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def random_flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(batch), generator=generator, device=generator.device) < 0.5
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


# ---------------------------------------------------------------------------------------------------- loop

def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine to zero at `total`: the schedule always ends where the run ends."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclasses.dataclass
class Clock:
    """This invocation's piece deadline, and the UNet budget that sets the UNet's step count."""
    piece_deadline: float | None = None
    unet_budget_s: float | None = None


def train_loop(stage: str, work: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
               step_fn: Callable[[int], torch.Tensor], total: int, recipe: Recipe, generator: torch.Generator,
               clock: Clock, log, ema=None, base_lr: float = 1e-3, budget: Callable | None = None) -> dict:
    """The one loop every stage runs: learning-rate schedule, EMA, logging, checkpoints, resume and pieces.

    `budget(step, seconds, steps_timed)` may return a new total once, after the first timed steps (--max-minutes).
    Returns the stage's summary: steps run and the mean loss of its last 100 steps.
    """
    path = work / f"{stage}.checkpoint.safetensors"
    params = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    start, recent = 0, []
    if path.is_file():
        state = load_checkpoint(path)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if ema is not None:
            ema.shadow_params = [p.to(params[0].device) for p in state["ema"]]
            ema.optimization_step = state["ema_step"]
        start, total, recent = state["step"], state["total"], list(state["recent"])
        log({"stage": stage, "resumed_at_step": start, "of": total})

    def checkpoint(step: int) -> None:
        save_checkpoint(path, {
            "modules": {name: module.state_dict() for name, module in modules.items()},
            "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": step,
            "total": total, "recent": recent[-100:],
            "ema": list(ema.shadow_params) if ema is not None else None,
            "ema_step": ema.optimization_step if ema is not None else None,
        })

    timer, step = time.monotonic(), start
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = base_lr * lr_factor(step, recipe.warmup, total)
        loss = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema is not None:
            ema.step(params)
        recent = (recent + [loss.detach().float().cpu()])[-100:]
        step += 1
        if budget is not None:
            resized = budget(step, time.monotonic() - timer, step - start)
            if resized is not None and resized != total:
                total = resized
                log({"stage": stage, "steps_set_by_budget": total})
        if step % 100 == 0 or step == total:
            log({"stage": stage, "step": step, "of": total, "loss": float(torch.stack(recent).mean())})
        piece_over = clock.piece_deadline is not None and time.monotonic() > clock.piece_deadline
        if step % recipe.checkpoint_every == 0 or step == total or piece_over:
            checkpoint(step)
        if piece_over and step < total:
            raise Paused(f"{stage} step {step} of {total}")
    return {"steps": total, "final_loss": float(torch.stack(recent).mean()) if recent else float("nan")}


# ---------------------------------------------------------------------------------------------------- stages

def train_clip(clip, tokenizer, recipe: Recipe, device, work: Path, clock: Clock, log, seed: int) -> dict:
    """Contrastive image-text training over all ten classes; several captions per class name.

    With ten classes a batch holds many images of one class, so plain CLIP's one-positive loss would push
    apart captions and images that match; each image's target is every caption of its class (and each
    caption's, every image of its class in the batch), as in supervised-contrastive variants of CLIP.
    """
    images, labels = class_images("train", CLASSES, recipe.images_per_class)
    images, labels = images.to(device), labels.to(device)
    captions = [template.format(name) for name in CLASSES for template in CAPTION_TEMPLATES]
    caption_class = torch.arange(len(CLASSES), device=device).repeat_interleave(len(CAPTION_TEMPLATES))
    ids = tokenizer(captions, padding=True, return_tensors="pt").input_ids.to(device)
    generator = torch.Generator(device).manual_seed(seed * 1000 + 1)
    clip.to(device).train()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=recipe.clip_lr, weight_decay=0.05)

    def step_fn(_: int) -> torch.Tensor:
        pick = torch.randint(len(images), (recipe.clip_batch,), generator=generator, device=device)
        image_features = F.normalize(
            _features(clip.get_image_features(pixel_values=random_flip(images[pick], generator))), dim=-1)
        text_features = F.normalize(_features(clip.get_text_features(input_ids=ids)), dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * image_features @ text_features.T
        match = (labels[pick][:, None] == caption_class[None]).float()
        image_loss = -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        present = match.sum(0) > 0  # captions whose class has an image in this batch
        text_targets = match.T[present] / match.T[present].sum(1, keepdim=True)
        text_loss = -(text_targets * logits.T[present].log_softmax(1)).sum(1).mean()
        return (image_loss + text_loss) / 2

    summary = train_loop("clip", work, {"clip": clip}, optimizer, step_fn, recipe.clip_steps, recipe, generator,
                         clock, log, base_lr=recipe.clip_lr)
    clip.eval()
    return {"clip_steps": summary["steps"], "clip_final_loss": summary["final_loss"],
            "clip_zero_shot": zero_shot_accuracy(clip, tokenizer, device)}


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features, 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def zero_shot_accuracy(clip, tokenizer, device) -> dict:
    """CLIP's zero-shot accuracy on the whole real test set: the nearest class by mean caption feature."""
    images, labels = load_fashion_mnist("test")
    x = to_model_range(images)
    captions = [template.format(name) for name in CLASSES for template in CAPTION_TEMPLATES]
    ids = tokenizer(captions, padding=True, return_tensors="pt").input_ids.to(device)
    text = F.normalize(_features(clip.get_text_features(input_ids=ids)), dim=-1)
    text = F.normalize(text.view(len(CLASSES), len(CAPTION_TEMPLATES), -1).mean(1), dim=-1)
    predicted = torch.cat([
        (F.normalize(_features(clip.get_image_features(pixel_values=x[i:i + 1000].to(device))), dim=-1)
         @ text.T).argmax(1).cpu()
        for i in range(0, len(x), 1000)])
    truth = torch.from_numpy(labels).long()
    per_class = {name: float((predicted[truth == k] == k).float().mean()) for k, name in enumerate(CLASSES)}
    return {"overall": float((predicted == truth).float().mean()), "per_class": per_class}


def train_vae(vae, recipe: Recipe, device, work: Path, clock: Clock, log, seed: int) -> dict:
    images, _ = class_images("train", CLASSES, recipe.images_per_class)
    images = images.to(device)
    generator = torch.Generator(device).manual_seed(seed * 1000 + 2)
    vae.to(device).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=recipe.vae_lr)

    def step_fn(_: int) -> torch.Tensor:
        batch = random_flip(images[torch.randint(len(images), (recipe.vae_batch,), generator=generator, device=device)],
                            generator)
        posterior = vae.encode(batch).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator, device=device)
        reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample
        return F.mse_loss(reconstruction, batch) + recipe.kl_weight * posterior.kl().mean()

    summary = train_loop("vae", work, {"vae": vae}, optimizer, step_fn, recipe.vae_steps, recipe, generator, clock, log,
                         base_lr=recipe.vae_lr)
    vae.eval()
    return {"vae_steps": summary["steps"], "vae_final_loss": summary["final_loss"],
            "vae_test_mse": reconstruction_mse(vae, device)}


@torch.no_grad()
def reconstruction_mse(vae, device) -> dict:
    """Pixel MSE in [-1, 1] of the posterior mode, on the held-out real test set, per class and overall."""
    images, labels = load_fashion_mnist("test")
    x = to_model_range(images)
    errors = torch.cat([
        (vae.decode(vae.encode(x[i:i + 500].to(device)).latent_dist.mode()).sample.float().cpu() - x[i:i + 500])
        .pow(2).mean(dim=(1, 2, 3)) for i in range(0, len(x), 500)])
    truth = torch.from_numpy(labels)
    return {"overall": float(errors.mean()),
            "per_class": {name: float(errors[truth == k].mean()) for k, name in enumerate(CLASSES)}}


@torch.no_grad()
def encode_all(vae, images, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image and its mirror image (the UNet's flip augmentation)."""
    means, stds = [], []
    for flip in (False, True):  # all images, then all mirrors: labels.repeat(2) lines up
        for start in range(0, len(images), 512):
            batch = images[start:start + 512].to(device)
            dist = vae.encode(batch.flip(-1) if flip else batch).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def unet_scaling(latents) -> float:
    """SD's scaling_factor: 1 / std of the latents, so the UNet sees unit variance."""
    means, stds = latents
    return float(1.0 / (means.pow(2).mean() + stds.pow(2).mean() - means.mean().pow(2)).sqrt())


TIMED_STEPS = 30  # UNet steps timed before --max-minutes sets the step count (fewer than any warm-up)


def budget_steps(seconds_per_step: float, budget_s: float, recipe: Recipe) -> int:
    """How many UNet steps fit the budget: never past the recipe's, never inside the warm-up."""
    return max(recipe.warmup + 1, TIMED_STEPS + 1, min(recipe.unet_steps, int(budget_s / seconds_per_step)))


def make_ema(parameters, recipe: Recipe):
    """diffusers' EMA with its warm-up: decay 1 - (1 + step)^-2/3 (0.37 after one step, 0.99 after 1,000),
    capped at the recipe's, so a short run's average follows the weights instead of keeping the initial ones."""
    from diffusers.training_utils import EMAModel

    return EMAModel(parameters, decay=recipe.ema_decay, use_ema_warmup=True, power=2 / 3)


def train_unet(unet, text_encoder, tokenizer, vae, recipe: Recipe, device, work: Path, clock: Clock, log,
               seed: int) -> dict:
    """The UNet on the six common classes, on the frozen text tower; returns its EMA weights in `unet`."""
    images, labels = class_images("train", COMMON_CLASSES, recipe.images_per_class)
    means, stds = (part.to(device) for part in encode_all(vae, images, device))
    labels = labels.repeat(2).to(device)
    scaling = unet_scaling((means, stds))
    prompts = [PROMPT.replace("{class}", name) for name in COMMON_CLASSES] + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    with torch.no_grad():  # frozen, as SD's: seven prompts, embedded once
        embeddings = text_encoder.to(device).eval()(ids)[0]
    empty = len(prompts) - 1
    alphas = sd_ddpm_scheduler().alphas_cumprod.to(device)
    generator = torch.Generator(device).manual_seed(seed * 1000 + 3)
    unet.to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=0.01)
    ema = make_ema(unet.parameters(), recipe)
    autocast = bf16_autocast(device)

    def step_fn(_: int) -> torch.Tensor:
        pick = torch.randint(len(means), (recipe.unet_batch,), generator=generator, device=device)
        z = (means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=generator, device=device)) * scaling
        drop = torch.rand(len(pick), generator=generator, device=device) < recipe.uncond_prob
        which = torch.where(drop, empty, labels[pick])
        noise = torch.randn(z.shape, generator=generator, device=device)
        t = torch.randint(0, len(alphas), (len(z),), generator=generator, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        with autocast:
            prediction = unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, encoder_hidden_states=embeddings[which]).sample
        return F.mse_loss(prediction.float(), noise)

    state_file = work / "unet.steps.json"
    total = (read_json(state_file) or {}).get("steps", recipe.unet_steps)

    def budget(step: int, seconds: float, steps_timed: int) -> int | None:
        """--max-minutes: after the timed steps the budget fixes the step count once (kept for a resume)."""
        if clock.unet_budget_s is None or step < TIMED_STEPS or state_file.is_file():
            return None
        steps = budget_steps(seconds / steps_timed, clock.unet_budget_s, recipe)
        atomic_write_json(state_file, {"steps": steps, "seconds_per_step": seconds / steps_timed})
        return steps

    summary = train_loop("unet", work, {"unet": unet}, optimizer, step_fn, total, recipe, generator, clock, log,
                         ema=ema, base_lr=recipe.unet_lr, budget=budget)
    raw_loss = summary["final_loss"]
    ema.copy_to(unet.parameters())  # the shipped weights are the average
    unet.eval()
    return {"unet_steps": summary["steps"], "unet_raw_final_loss": raw_loss, "latent_scaling_factor": scaling,
            "unet_ema_loss": denoising_loss(unet, embeddings, means, stds, labels, scaling, alphas, device, seed)}


@torch.no_grad()
def denoising_loss(unet, embeddings, means, stds, labels, scaling, alphas, device, seed: int, n: int = 4096) -> float:
    """The shipped (EMA) UNet's own noise-prediction loss on training latents: a fixed draw, prompts as asked."""
    generator = torch.Generator(device).manual_seed(seed * 1000 + 4)
    pick = torch.randint(len(means), (n,), generator=generator, device=device)
    z = (means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=generator, device=device)) * scaling
    noise = torch.randn(z.shape, generator=generator, device=device)
    t = torch.randint(0, len(alphas), (n,), generator=generator, device=device)
    a = alphas[t].view(-1, 1, 1, 1)
    total = 0.0
    for i in range(0, n, 512):
        s = slice(i, i + 512)
        prediction = unet(a[s].sqrt() * z[s] + (1 - a[s]).sqrt() * noise[s], t[s],
                          encoder_hidden_states=embeddings[labels[pick[s]]]).sample.float()
        total += F.mse_loss(prediction, noise[s], reduction="sum").item()
    return total / noise.numel()


# ---------------------------------------------------------------------------------------------------- files

def save(out: Path, modules: dict) -> None:
    """The pipeline's folders plus the whole CLIP (both towers, projections) in `clip/`."""
    from diffusers import DPMSolverMultistepScheduler

    out.mkdir(parents=True, exist_ok=True)
    parts = {"unet": modules["unet"], "vae": modules["vae"], "text_encoder": text_tower_of(modules["clip"]),
             "clip": modules["clip"]}
    for name, module in parts.items():
        # float16 on disk halves the package; loading casts to whatever dtype the run asks for.
        # nn.Module.to: diffusers' own warns on every cast although these models keep nothing in float32.
        torch.nn.Module.to(module, "cpu", torch.float16).save_pretrained(out / name, safe_serialization=True)
        torch.nn.Module.to(module, torch.float32)
    # Sampling defaults to DPM-Solver++ on the training betas: 25 steps are plenty at 8x8 latents.
    DPMSolverMultistepScheduler.from_config(sd_ddpm_scheduler().config).save_pretrained(out / "scheduler")


def sample_grid(out: Path, device, seeds: int = 8) -> None:
    """Images for every class (the six seen, then the four never seen), one row each."""
    from PIL import Image

    from .gate import load_for_sampling, sample_class

    base = load_for_sampling(out, device)
    rows = [sample_class(base, name, range(seeds), device) for name in (*COMMON_CLASSES, *RARE_CLASSES)]
    grid = torch.stack(rows).permute(0, 3, 1, 4, 2).reshape(len(rows) * RESOLUTION, seeds * RESOLUTION, 3)
    Image.fromarray(grid.mul(255).round().byte().numpy()).resize(
        (seeds * RESOLUTION * 2, len(rows) * RESOLUTION * 2), Image.NEAREST).save(out / "sample_grid.png",
                                                                                   optimize=True)


# The recipe fields each stage's result depends on: a stage is reused when only a later stage's settings change.
STAGE_FIELDS = {
    "clip": ("clip_steps", "clip_batch", "clip_lr", "warmup", "images_per_class"),
    "vae": ("vae_steps", "vae_batch", "vae_lr", "warmup", "kl_weight", "images_per_class"),
}


def stage_folders(root: Path, recipe: Recipe, seed: int, max_minutes: float | None) -> dict[str, Path]:
    """One work folder per stage and the settings its result depends on: a resume never mixes two configs."""
    def key(payload) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]

    settings = dataclasses.asdict(recipe)
    tags = {name: key([{f: settings[f] for f in fields}, seed]) for name, fields in STAGE_FIELDS.items()}
    tags["unet"] = key([settings, seed, max_minutes, tags["clip"], tags["vae"]])
    return {name: root / f"{name}-{tag}" for name, tag in tags.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=None,
                        help="checkpoints (default: .<out>.work beside --out; never committed)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="the UNet stage's budget: sets its step count (and schedule) from its measured speed")
    parser.add_argument("--piece-minutes", type=float, default=None,
                        help="stop cleanly after this many minutes; the same command resumes")
    parser.add_argument("--samples-per-class", type=int, default=64, help="the quality gate's samples per class")
    args = parser.parse_args(argv)
    try:
        run(args, argv)
    except Paused as paused:
        print(json.dumps({"paused": str(paused), "resume": "run the same command again"}), flush=True)
    except RareaugError as error:
        raise SystemExit(f"error: {error}") from None


def run(args, argv) -> None:
    from .gate import quality_gate

    recipe, device = RECIPES[args.recipe], torch.device(args.device)
    started = time.monotonic()
    clock = Clock(piece_deadline=started + args.piece_minutes * 60 if args.piece_minutes else None,
                  unet_budget_s=args.max_minutes * 60 if args.max_minutes else None)
    folders = stage_folders(args.work or args.out.parent / f".{args.out.name}.work", recipe, args.seed,
                            args.max_minutes)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def log(record: dict) -> None:
        print(json.dumps({"t_s": round(time.monotonic() - started, 1), **record}), flush=True)

    def stage(name: str, modules: dict, train: Callable[[Path], dict]) -> dict:
        """A finished stage's weights and figures are loaded; otherwise it trains (resuming) in its folder."""
        folder = folders[name]
        folder.mkdir(parents=True, exist_ok=True)
        progress = read_json(folder / "progress.json") or {"minutes": 0.0, "result": None}
        if progress["result"] is not None:
            for key, state in load_checkpoint(folder / "done.safetensors").items():
                modules[key].load_state_dict(state)
                modules[key].to(device).eval()
            return progress
        piece_started = time.monotonic()
        try:
            result = train(folder)
            save_checkpoint(folder / "done.safetensors", {n: m.state_dict() for n, m in modules.items()})
            progress["result"] = result
            log({"stage": name, "done": True, **result})
        finally:
            progress["minutes"] += (time.monotonic() - piece_started) / 60
            atomic_write_json(folder / "progress.json", progress)
        return progress

    torch.manual_seed(args.seed)  # the architecture's initial weights
    modules = build_untrained()
    tokenizer = clip_tokenizer()
    log({"device": device_label(device), "work": str(folders["unet"].parent), "recipe": args.recipe})
    done = [stage("clip", {"clip": modules["clip"]},
                  lambda work: train_clip(modules["clip"], tokenizer, recipe, device, work, clock, log, args.seed)),
            stage("vae", {"vae": modules["vae"]},
                  lambda work: train_vae(modules["vae"], recipe, device, work, clock, log, args.seed))]
    text_encoder = text_tower_of(modules["clip"])
    done.append(stage("unet", {"unet": modules["unet"]},
                      lambda work: train_unet(modules["unet"], text_encoder, tokenizer, modules["vae"], recipe, device,
                                              work, clock, log, args.seed)))
    summary = {key: value for progress in done for key, value in progress["result"].items()}
    minutes = sum(progress["minutes"] for progress in done)
    modules["vae"].register_to_config(scaling_factor=summary["latent_scaling_factor"])
    # Built beside --out and swapped in at the end: a failure never leaves new weights under an old model card.
    staging = args.out.parent / f".{args.out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    save(staging, modules)
    sample_grid(staging, device)
    summary.update({
        "gate": quality_gate(staging, device, n=args.samples_per_class),
        "recipe_name": args.recipe, "recipe": dataclasses.asdict(recipe), "seed": args.seed,
        "device": device_label(device), "training_minutes": minutes,
        "command": "python -m rareaug.models.mini.train " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "parameters": {name: sum(p.numel() for p in modules[name].parameters()) for name in COMPONENTS},
    })
    atomic_write_json(staging / "training.json", summary)
    from .card import write_card

    write_card(staging, summary)
    replaced = args.out.parent / f".{args.out.name}.old"
    if args.out.exists():
        args.out.rename(replaced)
    staging.rename(args.out)
    shutil.rmtree(replaced, ignore_errors=True)
    log({"done": True, "gate": summary["gate"]["passed"]})


if __name__ == "__main__":
    main()

"""Train `rareaug-mini` from scratch on six common Fashion-MNIST classes; write weights, model card and sample grid.

    python -m rareaug.models.mini.train --out rareaug/models/mini/weights --recipe gpu   # an H100/H200, minutes
    python -m rareaug.models.mini.train --out /tmp/mini --recipe cpu                     # 2 CPU cores, < 90 min

Two stages, as Stable Diffusion was made: a KL autoencoder on the images, then the UNet and the CLIP text
encoder together on its latents (epsilon prediction, SD's noise schedule, 10% empty prompts so classifier-free
guidance works), with an exponential moving average of both. The four rare classes are never loaded.
Same seed and recipe on the same device kind: same weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ...samples.fashion_mnist import COMMON_CLASSES, RARE_CLASSES, class_index, load_fashion_mnist
from ...fit import device_label
from ..tiny import clip_tokenizer, sd_ddpm_scheduler
from . import COMPONENTS, PROMPT, RESOLUTION, build_untrained


@dataclasses.dataclass(frozen=True)
class Recipe:
    vae_steps: int
    vae_batch: int
    unet_steps: int
    unet_batch: int
    vae_lr: float = 1e-3
    unet_lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    kl_weight: float = 1e-5
    uncond_prob: float = 0.1
    images_per_class: int | None = None  # None: all 6,000


RECIPES = {
    "gpu": Recipe(vae_steps=2000, vae_batch=256, unet_steps=6000, unet_batch=512, unet_lr=1e-3),
    # Measured here: 0.66 s an autoencoder step and 0.53 s a UNet step at batch 128 on 2 cores: about 78 minutes.
    "cpu": Recipe(vae_steps=1000, vae_batch=128, unet_steps=7500, unet_batch=128),
    "smoke": Recipe(vae_steps=3, vae_batch=8, unet_steps=3, unet_batch=8, warmup=1, images_per_class=8),
}


def common_class_images(recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Real training images of the six common classes in [-1, 1], 3 x 32 x 32, and their index in COMMON_CLASSES."""
    images, labels = load_fashion_mnist("train")
    xs, ys = [], []
    for k, name in enumerate(COMMON_CLASSES):
        picked = images[labels == class_index(name)][:recipe.images_per_class]
        xs.append(picked)
        ys.append(np.full(len(picked), k))
    x = np.pad(np.concatenate(xs), ((0, 0), (2, 2), (2, 2)))  # black, as Fashion-MNIST's own background
    x = torch.from_numpy(x).float().div(127.5).sub(1).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(np.concatenate(ys))


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def train_vae(vae, images, recipe: Recipe, device, log) -> dict:
    vae.to(device).train()
    images = images.to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=recipe.vae_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe.warmup, recipe.vae_steps))
    losses = []
    for step in range(recipe.vae_steps):
        batch = images[torch.randint(len(images), (recipe.vae_batch,), device=device)]
        flip = torch.rand(len(batch), device=device) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction, batch)
        loss = mse + recipe.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(mse.detach())
        if step % 200 == 0 or step == recipe.vae_steps - 1:
            log({"stage": "vae", "step": step, "mse": _recent(losses)})
    vae.eval()
    return {"vae_final_mse": _recent(losses)}


def _recent(losses: list[torch.Tensor], n: int = 100) -> float:
    return torch.stack(losses[-n:]).mean().item()  # one device sync per log line, not per step


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


def train_denoiser(unet, text_encoder, tokenizer, latents, labels, scaling: float, recipe: Recipe, device, deadline,
                   log) -> dict:
    """UNet and text encoder together; returns their EMA copies and a summary."""
    means, stds = (part.to(device) for part in latents)
    labels = labels.to(device)
    prompts = [PROMPT.replace("{class}", name) for name in COMMON_CLASSES] + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    empty = len(prompts) - 1
    scheduler = sd_ddpm_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    unet.to(device).train()
    text_encoder.to(device).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe.warmup, recipe.unet_steps))
    ema = {name: AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)
           for name, module in (("unet", unet), ("text_encoder", text_encoder))}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    losses, step = [], 0
    for step in range(recipe.unet_steps):
        pick = torch.randint(len(means), (recipe.unet_batch,), device=device)
        z = (means[pick] + stds[pick] * torch.randn_like(means[pick])) * scaling
        which = labels[pick]
        which = torch.where(torch.rand(len(which), device=device) < recipe.uncond_prob, empty, which)
        noise = torch.randn_like(z)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z),), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        with autocast:
            embeds = text_encoder(ids)[0][which]
            prediction = unet(noisy, t, encoder_hidden_states=embeds).sample
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        for name, module in (("unet", unet), ("text_encoder", text_encoder)):
            ema[name].update_parameters(module)
        losses.append(loss.detach())
        if step % 200 == 0 or step == recipe.unet_steps - 1:
            log({"stage": "unet", "step": step, "loss": _recent(losses)})
        if deadline and time.monotonic() > deadline:
            log({"stage": "unet", "stopped_at_step": step + 1, "why": "--max-minutes reached"})
            break
    return {"unet_final_loss": _recent(losses), "unet_steps_done": step + 1,
            "ema": {name: copy.module for name, copy in ema.items()}}


def unet_scaling(latents) -> float:
    """SD's scaling_factor: 1 / std of the latents, so the UNet sees unit variance."""
    means, stds = latents
    return float(1.0 / (means.pow(2).mean() + stds.pow(2).mean() - means.mean().pow(2)).sqrt())


def save(out: Path, unet, vae, text_encoder) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        # float16 on disk halves the package; loading casts to whatever dtype the run asks for.
        # nn.Module.to: diffusers' own warns on every cast although these models keep nothing in float32.
        torch.nn.Module.to(module, "cpu", torch.float16).save_pretrained(out / name, safe_serialization=True)
        torch.nn.Module.to(module, torch.float32)
    scheduler = sd_ddpm_scheduler()
    from diffusers import DPMSolverMultistepScheduler

    # Sampling defaults to DPM-Solver++ on the training betas: 25 steps are plenty at 8x8 latents.
    DPMSolverMultistepScheduler.from_config(scheduler.config).save_pretrained(out / "scheduler")


def sample_grid(out: Path, device, seeds: int = 8):
    """Images for every class (the six seen, then the four never seen), one row each; returns (images, names)."""
    from PIL import Image

    from ...generate.sampler import BankSampler, SampleRequest
    from ..base import frozen_base_model
    from . import load_mini_components

    base = frozen_base_model(load_mini_components(out), str(out), False, device, torch.float32)
    rows, names = [], []
    for name in (*COMMON_CLASSES, *RARE_CLASSES):
        sampler = BankSampler(base, None, PROMPT.replace("{class}", name), 3.0, 25, "default", device, RESOLUTION)
        rows.append(sampler.sample([SampleRequest([], [], [], seed) for seed in range(seeds)]))
        names += [name] * seeds
    images = torch.cat(rows)
    grid = images.view(len(rows), seeds, 3, RESOLUTION, RESOLUTION).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(len(rows) * RESOLUTION, seeds * RESOLUTION, 3).mul(255).round().byte().numpy()
    Image.fromarray(grid).resize((seeds * RESOLUTION * 2, len(rows) * RESOLUTION * 2), Image.NEAREST).save(
        out / "sample_grid.png", optimize=True)
    return images, names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop the UNet stage early (noted in the card)")
    args = parser.parse_args(argv)
    recipe, device = RECIPES[args.recipe], torch.device(args.device)
    started = time.monotonic()
    deadline = started + args.max_minutes * 60 if args.max_minutes else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def log(record: dict) -> None:
        print(json.dumps({"t_s": round(time.monotonic() - started, 1), **record}), flush=True)

    # 1. Data and architecture, seeded
    torch.manual_seed(args.seed)
    images, labels = common_class_images(recipe)
    log({"images": len(images), "classes": list(COMMON_CLASSES), "device": device_label(device)})
    modules = build_untrained()
    tokenizer = clip_tokenizer()
    # 2. Autoencoder
    summary = train_vae(modules["vae"], images, recipe, device, log)
    latents = encode_all(modules["vae"], images, device)
    scaling = unet_scaling(latents)
    modules["vae"].register_to_config(scaling_factor=scaling)
    log({"latent_scaling_factor": scaling})
    # 3. Denoiser and text encoder on the latents (labels twice: each image and its mirror)
    result = train_denoiser(modules["unet"], modules["text_encoder"], tokenizer, latents, labels.repeat(2), scaling,
                            recipe, device, deadline, log)
    ema = result.pop("ema")
    summary.update(result)
    # Built beside --out and swapped in at the end: a failure never leaves new weights under an old model card.
    staging = args.out.parent / f".{args.out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    save(staging, ema["unet"], modules["vae"], ema["text_encoder"])
    # 4. Samples, judged by a classifier trained on real images
    from .check import judge_images, train_judge

    generated, asked = sample_grid(staging, device)
    judged = judge_images(train_judge(), generated.cpu())
    agreement = {name: sum(j == a for j, a in zip(judged, asked) if a == name) / asked.count(name)
                 for name in dict.fromkeys(asked)}
    summary.update({
        "recipe_name": args.recipe, "recipe": dataclasses.asdict(recipe), "seed": args.seed,
        "device": device_label(device), "minutes": (time.monotonic() - started) / 60,
        "latent_scaling_factor": scaling, "judge_agreement": agreement,
        "command": "python -m rareaug.models.mini.train " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "parameters": {name: sum(p.numel() for p in modules[name].parameters()) for name in COMPONENTS},
    })
    (staging / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_card(staging, summary)
    replaced = args.out.parent / f".{args.out.name}.old"
    if args.out.exists():
        args.out.rename(replaced)
    staging.rename(args.out)
    shutil.rmtree(replaced, ignore_errors=True)
    log({"done": True, **{k: v for k, v in summary.items() if k not in ("recipe",)}})


def write_card(out: Path, summary: dict) -> None:
    """The model card: what it saw, what it never saw, how it was made, how well it draws."""
    recipe = summary["recipe"]
    sizes = {name: sum(f.stat().st_size for f in (out / name).glob("*.safetensors")) for name in COMPONENTS}
    seen = [f"| {name} | {summary['judge_agreement'][name]:.0%} |" for name in COMMON_CLASSES]
    unseen = [f"| {name} (never seen) | {summary['judge_agreement'][name]:.0%} |" for name in RARE_CLASSES]
    stopped = ("" if summary["unet_steps_done"] == recipe["unet_steps"] else
               f" (stopped at step {summary['unet_steps_done']} by --max-minutes)")
    lines = [
        "# rareaug-mini",
        "",
        "A small Stable Diffusion (KL autoencoder, CLIP text encoder with the real 49,408-token BPE tokenizer,",
        "cross-attention UNet; diffusers classes) trained from scratch, offline, at 32 x 32 px. It is the embedded",
        "default of `rareaug demo` and the base model of `bench/evidence.py`: `--base-model mini`.",
        "",
        "## Data",
        f"Fashion-MNIST training images (Zalando Research, MIT licence) of six common classes only: "
        f"{', '.join(COMMON_CLASSES)} ({recipe['images_per_class'] or 6000} each, padded 28 -> 32 px with black, "
        f"horizontal flips), prompts `{PROMPT}`. It has never seen {', '.join(RARE_CLASSES)}: those are the rare "
        f"classes of the evidence benchmark.",
        "",
        "## How it was made",
        f"- Command: `{summary['command']}` (seed {summary['seed']}), {summary['date']}, torch {summary['torch']}, "
        f"on {summary['device']}, {summary['minutes']:.1f} minutes.",
        f"- Autoencoder: {recipe['vae_steps']} steps, batch {recipe['vae_batch']}, Adam lr {recipe['vae_lr']}, "
        f"MSE + {recipe['kl_weight']} x KL; final MSE {summary['vae_final_mse']:.4f}; latents 8 x 8 x 4, "
        f"scaling factor {summary['latent_scaling_factor']:.3f}.",
        f"- UNet and text encoder together: {recipe['unet_steps']} steps{stopped}, batch {recipe['unet_batch']}, "
        f"AdamW lr {recipe['unet_lr']} (warm-up {recipe['warmup']}, cosine), epsilon prediction on SD's "
        f"scaled-linear schedule, {recipe['uncond_prob']:.0%} empty prompts, EMA {recipe['ema_decay']}; "
        f"final loss {summary['unet_final_loss']:.4f}.",
        "- Parameters: " + ", ".join(f"{name} {n / 1e6:.2f} M" for name, n in summary["parameters"].items())
        + f"; {sum(sizes.values()) / 1e6:.1f} MB in float16.",
        "- Sampling default: DPM-Solver++ (the scheduler folder), 25 steps; guidance 3.0 in the grid below.",
        "",
        "## Does it draw what it is asked?",
        "A small CNN trained on real Fashion-MNIST (all ten classes, `rareaug.models.mini.check`) labels 8 samples",
        "per prompt; the share that gets the prompted class:",
        "",
        "| prompt | judged as asked |",
        "| --- | --- |",
        *seen,
        *unseen,
        "",
        "Rows of `sample_grid.png`, top to bottom: " + ", ".join((*COMMON_CLASSES, *RARE_CLASSES)) + ".",
        "",
        "![samples](sample_grid.png)",
        "",
        "## Licence",
        "Weights: Apache-2.0, as rareaug. Training data: Fashion-MNIST, MIT licence, Copyright (c) 2017 Zalando SE.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()

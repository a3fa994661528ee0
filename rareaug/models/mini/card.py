"""The model card, written by the training script from its own figures: what it saw, what it never saw, how it
was made, how well it draws (the quality gate) and what one LoRA on one unseen garment draws."""
from __future__ import annotations

import json
from pathlib import Path

from ...samples.fashion_mnist import CLASSES, COMMON_CLASSES, RARE_CLASSES
from . import CAPTION_TEMPLATES, COMPONENTS, PROMPT

LORA_FIDELITY = Path(__file__).resolve().parents[3] / "bench" / "results" / "lora-fidelity-pullover.json"


def write_card(out: Path, summary: dict) -> None:
    recipe, gate = summary["recipe"], summary["gate"]
    sizes = {name: sum(f.stat().st_size for f in (out / name).glob("*.safetensors"))
             for name in (*COMPONENTS, "text_encoder")}
    shipped = sum(sizes[name] for name in ("unet", "vae", "clip", "text_encoder"))
    zero_shot = summary["clip_zero_shot"]
    vae = summary["vae_test_mse"]
    rows = [f"| {name}{'' if name in COMMON_CLASSES else ' (never drawn)'} | {gate['agreement'][name]:.0%} | "
            + ", ".join(f"{label} {share:.0%}" for label, share in list(gate["judged_as"][name].items())[:3]) + " |"
            for name in (*COMMON_CLASSES, *RARE_CLASSES)]
    lines = [
        "# rareaug-mini (v2)",
        "",
        "A small Stable Diffusion trained from scratch, offline, at 32 x 32 px, with diffusers and transformers "
        "classes:",
        "a KL autoencoder (8 x 8 x 8 latents), a cross-attention UNet, and the small CLIP (image tower + text tower,",
        "real 49,408-token BPE tokenizer) whose frozen text tower conditions the UNet, as SD's UNet reads a frozen "
        "CLIP.",
        "It is the embedded default of `rareaug demo` and the base model of `bench/evidence.py`: `--base-model mini`.",
        "",
        "## What each part saw",
        "Fashion-MNIST training images (Zalando Research, MIT licence), padded 28 -> 32 px with black, mirrored at "
        "random:",
        f"- **CLIP** (`clip/`, both towers; `text_encoder/` is its text tower again, where SD pipelines look): all ten "
        f"classes, captions from {len(CAPTION_TEMPLATES)} templates per class name (`{CAPTION_TEMPLATES[0]}`, "
        f"`{CAPTION_TEMPLATES[1]}`, ...). Zero-shot accuracy on the whole real test set (10,000 images): "
        f"**{zero_shot['overall']:.1%}** ("
        + ", ".join(f"{name} {zero_shot['per_class'][name]:.0%}" for name in CLASSES) + ").",
        "- **Autoencoder**: all ten classes, as SD's autoencoder is a general image codec.",
        f"- **UNet**: the six common classes only ({', '.join(COMMON_CLASSES)}; "
        f"{recipe['images_per_class'] or 6000} each), prompt `{PROMPT}`, 10% empty prompts.",
        "",
        f"The UNet has **never seen {', '.join(RARE_CLASSES)}**, yet its CLIP knows them by name and sight, as SD's",
        "CLIP has seen chest X-rays that SD cannot draw: these are the rare classes of the evidence benchmark.",
        "",
        "## How it was made",
        f"- Command: `{summary['command']}` (seed {summary['seed']}), {summary['date']}, torch {summary['torch']}, "
        f"on {summary['device']}, {summary['training_minutes']:.1f} minutes of training (resumable; the sum of its "
        "pieces).",
        f"- CLIP: {summary['clip_steps']} steps, batch {recipe['clip_batch']}, AdamW lr {recipe['clip_lr']}, "
        f"contrastive with every caption of an image's class as its positives; final loss "
        f"{summary['clip_final_loss']:.3f}.",
        f"- Autoencoder: {summary['vae_steps']} steps, batch {recipe['vae_batch']}, Adam lr {recipe['vae_lr']}, MSE + "
        f"{recipe['kl_weight']} x KL. Reconstruction MSE (pixels in [-1, 1], posterior mode) on the held-out real "
        f"test set: **{vae['overall']:.4f}** (" + ", ".join(f"{n} {vae['per_class'][n]:.4f}" for n in CLASSES)
        + f"); latent scaling factor {summary['latent_scaling_factor']:.3f}.",
        f"- UNet: {summary['unet_steps']} steps (the learning-rate schedule sized to them), "
        f"batch {recipe['unet_batch']}, "
        f"AdamW lr {recipe['unet_lr']} (warm-up {recipe['warmup']}, cosine to zero), epsilon prediction on SD's "
        f"scaled-linear schedule, EMA with diffusers' warm-up (decay 1 - (1 + step)^-2/3, capped at "
        f"{recipe['ema_decay']}). Loss of the raw weights over the last 100 steps "
        f"{summary['unet_raw_final_loss']:.4f}; "
        f"**the shipped EMA weights' own loss {summary['unet_ema_loss']:.4f}** (4,096 training latents, fixed draw).",
        "- Parameters: " + ", ".join(f"{name} {n / 1e6:.2f} M" for name, n in summary["parameters"].items())
        + f"; {shipped / 1e6:.1f} MB in float16 on disk.",
        "- Sampling default: DPM-Solver++ (the scheduler folder), 25 steps.",
        "",
        "## Quality gate: does it draw what it is asked?",
        f"The judge (`rareaug.models.mini.check`: a CNN trained on real images of all ten classes) labels "
        f"{gate['samples_per_class']} samples per prompt (seeds 0-{gate['samples_per_class'] - 1}, {gate['steps']} "
        f"steps, guidance {gate['guidance']}). Rule: {gate['rule']}. "
        f"**{'Passed' if gate['passed'] else 'NOT passed'}**: seen classes mean {gate['mean_seen']:.1%}, lowest "
        f"{gate['min_seen']:.1%}; the prompt moves an image {gate['prompt_moves']:.3f} against the seed's "
        f"{gate['seed_moves']:.3f}.",
        "",
        "| prompt | judged as asked | most often judged as |",
        "| --- | --- | --- |",
        *rows,
        "",
        "Rows of `sample_grid.png`, top to bottom: " + ", ".join((*COMMON_CLASSES, *RARE_CLASSES)) + " (8 seeds each).",
        "",
        "![samples](sample_grid.png)",
        "",
        *lora_fidelity_lines(),
        *known_limits(summary),
        "## Licence",
        "Weights: Apache-2.0, as rareaug. Training data: Fashion-MNIST, MIT licence, Copyright (c) 2017 Zalando SE.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def known_limits(summary: dict) -> list[str]:
    """What the aims asked and this model does not do, from its own figures."""
    limits = []
    vae = summary["vae_test_mse"]
    if vae["overall"] > 0.005:
        worst = sorted(vae["per_class"], key=vae["per_class"].get, reverse=True)[:3]
        limits.append(f"- The autoencoder's held-out error ({vae['overall']:.4f}) is above the 0.005 aimed for; "
                      f"it is highest for {', '.join(worst)}.")
    if not summary["gate"]["passed"]:
        limits.append("- The quality gate is not passed (see its table).")
    return ["## Known limits", "", *limits, ""] if limits else []


def lora_fidelity_lines() -> list[str]:
    """The method's premise, from `bench/lora_fidelity.py`'s committed result when there is one."""
    if not LORA_FIDELITY.is_file():
        return []
    result = json.loads(LORA_FIDELITY.read_text())
    lines = ["## One LoRA on one unseen garment", "",
             f"`{result['command']}` ({result['date']}): LoFT LoRAs (recipe defaults) on the {result['n_loras']} "
             f"real pullovers of the evidence split; samples that are near-copies of a real image are not counted.", "",
             "| samples | judged pullover | near-copies | diversity |", "| --- | --- | --- | --- |"]
    for row in result["rows"]:
        lines.append(f"| {row['name']} | {row['judged_rare']:.0%} of {row['counted']} | {row['near_copy_share']:.0%} | "
                     f"{row['diversity']:.3f} |")
    lines += ["", f"Diversity: {result['diversity_metric']}.", ""]
    variants = LORA_FIDELITY.with_name("lora-fidelity-pullover-variants.md")
    if variants.is_file():  # what moves these figures: one row per committed variant
        table = [line for line in variants.read_text().splitlines() if line.startswith("|")]
        lines += ["What moves them (`python bench/lora_fidelity.py --rare pullover --summarise`, one run per row; "
                  "judged share of the images that are not near-copies, in brackets of all):", "", *table, ""]
    return lines

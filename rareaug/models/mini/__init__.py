"""`rareaug-mini`: a small pretrained Stable Diffusion that ships inside the package (`--base-model mini`).

It has SD's three parts (VAE, CLIP text encoder with the real BPE tokenizer, cross-attention UNet) at 32 px
and was trained from scratch on six common Fashion-MNIST classes only, so the four it never saw (pullover,
dress, coat, shirt) can play the rare class in the evidence benchmark and the demo, offline. The weights,
the model card and the sample grid live in `weights/`; `python -m rareaug.models.mini.train` remakes them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from ...errors import RareaugError
from ..tiny import clip_text_encoder, clip_tokenizer

MINI_FOLDER = Path(__file__).parent / "weights"
RESOLUTION = 32  # Fashion-MNIST's 28 px, padded with its own black background
PROMPT = "a photo of a {class}"
COMPONENTS = ("unet", "vae", "text_encoder")


def build_untrained() -> dict[str, Any]:
    """The architecture, with fresh weights from the global RNG: what training starts from."""
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(48, 96, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(3, 6, 6),
        use_linear_projection=True,  # as SD 2.x
        norm_num_groups=16,
    )
    # Three blocks, two downsamples: 32 px images give 8x8x4 latents (SD's 8x would leave 4x4).
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    )
    # Hidden size 32 keeps the 49,408-row embedding table (the real tokenizer's) at 3 MB in float16.
    text_encoder = clip_text_encoder(hidden_size=32, intermediate_size=128, num_hidden_layers=3)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def load_mini_components(folder: Path = MINI_FOLDER) -> dict[str, Any]:
    """The shipped weights as StableDiffusionPipeline components (the tokenizer is built from open_clip's BPE)."""
    from diffusers import DPMSolverMultistepScheduler
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar for a 3 MB file is noise in every command's output

    missing = [name for name in (*COMPONENTS, "scheduler") if not (folder / name).is_dir()]
    if missing:
        raise RareaugError(f"{folder}: the mini model's {', '.join(missing)} folder is missing; reinstall rareaug, "
                           f"or remake it with `python -m rareaug.models.mini.train --out {folder}`")
    try:
        components = {
            "unet": UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True),
            "vae": AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True),
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True),
            "scheduler": DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler", local_files_only=True),
        }
    except Exception as error:  # diffusers/transformers raise many types; the user needs one line
        raise RareaugError(f"{folder}: the mini model did not load ({str(error).splitlines()[0][:200]}); "
                           f"reinstall rareaug") from error
    components["tokenizer"] = clip_tokenizer()
    return components

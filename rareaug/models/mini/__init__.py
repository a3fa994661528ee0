"""`rareaug-mini`: a small pretrained Stable Diffusion that ships inside the package (`--base-model mini`).

It has SD's parts (KL autoencoder, CLIP text encoder with the real BPE tokenizer, cross-attention UNet) at
32 px, plus the whole small CLIP it was conditioned on (`clip/`: image and text towers). The CLIP and the
autoencoder saw all ten Fashion-MNIST classes; the UNet only six, so the four it never drew (pullover, dress,
coat, shirt) can play the rare class in the evidence benchmark and the demo, offline, as a chest X-ray does
for SD. The weights, the model card and the sample grid live in `weights/`; `python -m
rareaug.models.mini.train` remakes them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from ...errors import RareaugError, one_line
from ..tiny import BOS_TOKEN_ID, CLIP_VOCAB_SIZE, EOS_TOKEN_ID, MODEL_MAX_LENGTH, clip_tokenizer

MINI_FOLDER = Path(__file__).parent / "weights"
RESOLUTION = 32  # Fashion-MNIST's 28 px, padded with its own black background
PROMPT = "a photo of a {class}"
COMPONENTS = ("unet", "vae", "clip")  # text_encoder/ is clip's text tower, saved again where SD pipelines look
LATENT_CHANNELS = 8  # 8 x 8 x 8 latents: 4 channels (256 numbers) cannot hold a 32-px garment's detail
# The CLIP's captions; the UNet is trained on PROMPT only, as the recipe prompts it.
CAPTION_TEMPLATES = ("a photo of a {}", "a {}", "a picture of a {}", "a grayscale photo of a {}",
                     "a low resolution photo of a {}", "a photo of the {}", "a product photo of a {}")


def build_untrained() -> dict[str, Any]:
    """The architecture, with fresh weights from the global RNG: what training starts from."""
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(48, 96, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(3, 6, 6),
        use_linear_projection=True,  # as SD 2.x
        norm_num_groups=16,
    )
    # Three blocks, two downsamples: 32 px images give 8x8 latents (SD's 8x would leave 4x4).
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    )
    # Text hidden size 32 keeps the 49,408-row embedding table (the real tokenizer's) at 3 MB in float16.
    # The image tower reads 3 x 32 x 32 images in [-1, 1] (as the autoencoder does) in 4-px patches.
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH, bos_token_id=BOS_TOKEN_ID,
                         eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID, hidden_act="quick_gelu"),
        vision_config=dict(image_size=RESOLUTION, patch_size=4, hidden_size=64, intermediate_size=256,
                           num_hidden_layers=4, num_attention_heads=4, hidden_act="quick_gelu"),
        projection_dim=32,
    ))
    return {"unet": unet, "vae": vae, "clip": clip}


def text_tower_of(clip: CLIPModel) -> CLIPTextModel:
    """A copy of the CLIP's text tower as the CLIPTextModel SD pipelines take.

    transformers 5's CLIPTextModel holds the tower's layers itself, 4.x's under `text_model`: keys are matched.
    """
    text_encoder = CLIPTextModel(clip.config.text_config)
    weights = clip.text_model.state_dict()
    prefix = "" if set(weights) == set(text_encoder.state_dict()) else "text_model."
    text_encoder.load_state_dict({prefix + key: value for key, value in weights.items()})
    return text_encoder.to(clip.dtype)


def load_mini_clip(folder: Path = MINI_FOLDER) -> CLIPModel:
    """Both towers the UNet's text encoder came from: for zero-shot checks and language-free adaptation."""
    if not (folder / "clip").is_dir():
        raise RareaugError(f"{folder}: the mini model's clip folder is missing; reinstall rareaug")
    return CLIPModel.from_pretrained(folder / "clip", local_files_only=True)


def load_mini_components(folder: Path = MINI_FOLDER) -> dict[str, Any]:
    """The shipped weights as StableDiffusionPipeline components (the tokenizer is built from open_clip's BPE)."""
    from diffusers import DPMSolverMultistepScheduler
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar for a 3 MB file is noise in every command's output

    missing = [name for name in ("unet", "vae", "text_encoder", "scheduler") if not (folder / name).is_dir()]
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
        raise RareaugError(f"{folder}: the mini model did not load ({one_line(error)}); "
                           f"reinstall rareaug") from error
    components["tokenizer"] = clip_tokenizer()
    return components

"""What the benchmarks share: an SD-2.1-base-sized model built from its configs with random weights (speed
does not depend on weight values) or the tiny model, and how figures are timed and printed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rareaug.models.base import BaseModel  # noqa: E402

# stabilityai/stable-diffusion-2-1-base: unet/config.json (866 M parameters), vae/config.json,
# text_encoder/config.json (OpenCLIP ViT-H text tower, 23 layers), scheduler/scheduler_config.json.
UNET = dict(act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
            cross_attention_dim=1024, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4, out_channels=4,
            layers_per_block=2, norm_num_groups=32, sample_size=64, use_linear_projection=True,
            flip_sin_to_cos=True, freq_shift=0)
VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
           layers_per_block=2, norm_num_groups=32, sample_size=768, scaling_factor=0.18215)
TEXT = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
            projection_dim=512, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True,
                 steps_offset=1)


def build(model: str, device: torch.device, dtype: torch.dtype, with_vae_and_text: bool = True) -> BaseModel:
    """`sd21`: random weights at full size; `tiny`: the test model."""
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel

    if model == "tiny":
        from rareaug.models import load_base_model

        return load_base_model("tiny", device=device, dtype=dtype)
    from transformers import CLIPTextConfig, CLIPTextModel

    from rareaug.models import clip_tokenizer

    with torch.device(device):
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE) if with_vae_and_text else None
        text = CLIPTextModel(CLIPTextConfig(**TEXT)) if with_vae_and_text else None
    for module in (unet, vae, text):
        if module is not None:
            torch.nn.Module.to(module, dtype=dtype)
            module.requires_grad_(False).eval()
    sampling = PNDMScheduler(**SCHEDULER)
    return BaseModel(unet=unet, vae=vae, text_encoder=text, tokenizer=clip_tokenizer() if text else None,
                     scheduler=DDPMScheduler.from_config(sampling.config), name="sd21-random", is_tiny=False,
                     prediction_type="epsilon", sampling_scheduler="PNDMScheduler")


def emit(record: dict) -> None:
    """One JSON line per figure, the moment it is measured (a run cut at its limit keeps what it printed)."""
    print(json.dumps(record), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def device_name(device: torch.device) -> str:
    import platform

    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def finish(summary: dict, out: Path | None) -> None:
    """Print the summary line and write it where --out says."""
    emit(summary)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")

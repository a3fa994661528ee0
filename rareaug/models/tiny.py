"""The real CLIP tokenizer built offline, and a tiny Stable Diffusion for tests and smoke runs.

Tests must never reach the Hugging Face hub, yet every stage should run the same code paths as on a real
SD 1.x/2.x model. So the tokenizer is the genuine 49,408-token CLIP BPE (its vocabulary ships inside the
open_clip_torch wheel), and the model has SD's architecture and latent geometry (4 latent channels, 8x
downsampling) at a size that builds in well under a second on a CPU.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..errors import RareaugError
from ..io import atomic_write_text

CLIP_VOCAB_SIZE = 49408
BOS_TOKEN_ID = 49406  # <|startoftext|>
EOS_TOKEN_ID = 49407  # <|endoftext|>, also SD 1.x's pad token
MODEL_MAX_LENGTH = 77
# A tokenizer below this size is not a CLIP tokenizer; transformers 5 silently builds a 2-token stand-in when a
# model's tokenizer files are missing offline, and every prompt then encodes to the unknown token.
MIN_TOKENIZER_SIZE = 49000
# OpenAI CLIP keeps the first 49152 - 256 - 2 merges of the file (its first line is a version header).
_N_MERGES = 49152 - 256 - 2


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (49,408 tokens), built offline from the vocabulary in open_clip's wheel.

    The vocab.json and merges.txt that transformers needs are derived once into a cache folder and reused.
    """
    folder = _tokenizer_cache_folder()
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        _write_tokenizer_files(folder)
    # from_pretrained (not the constructor) because it reads vocab/merges files on transformers 4 and 5 alike;
    # transformers 5's constructor ignores `vocab_file` and returns the 2-token stand-in.
    tokenizer = CLIPTokenizer.from_pretrained(
        str(folder), local_files_only=True, model_max_length=MODEL_MAX_LENGTH, pad_token="<|endoftext|>"
    )
    check_tokenizer(tokenizer, f"CLIP tokenizer cache {folder}")
    return tokenizer


def check_tokenizer(tokenizer: Any, where: str) -> None:
    """Refuse a stand-in tokenizer before it turns every prompt into the same unknown tokens.

    Args:
        tokenizer: anything with `len()`, normally a `CLIPTokenizer`.
        where: the model or folder it came from, named in the message.
    """
    size = len(tokenizer)
    if size < MIN_TOKENIZER_SIZE:
        raise RareaugError(
            f"{where}: its tokenizer has {size} tokens, not a CLIP tokenizer's {CLIP_VOCAB_SIZE} (tokenizer files "
            f"missing or unreadable); restore the model's tokenizer/ folder (tokenizer.json, or vocab.json and "
            f"merges.txt), or pass --base-model tiny for a smoke test"
        )


def build_tiny_components(seed: int = 0) -> dict[str, Any]:
    """A tiny SD-architecture model with fixed random weights: same seed, same weights; global RNG untouched.

    Returns:
        dict with unet, vae, text_encoder, tokenizer, scheduler (the keys StableDiffusionPipeline takes).
    """
    # The model classes initialise from the global RNG; forking it keeps callers' random streams unchanged.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet()
        vae = _tiny_vae()
        text_encoder = _tiny_text_encoder()
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": clip_tokenizer(),
        "scheduler": sd_ddpm_scheduler(),
    }


def sd_ddpm_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The training noise schedule of SD 1.x/2.x (scaled-linear betas); no sample clipping, as in SD."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def _tiny_unet() -> UNet2DConditionModel:
    # SD's block pattern (cross-attention in the high-resolution blocks, linear projections as in SD 2.x) so
    # LoRA targets to_q/to_k/to_v/to_out.0 exist where they do in the real model.
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=32,
    )


def _tiny_vae() -> AutoencoderKL:
    # Four blocks, three downsamples: the 8x latent geometry of SD, so 64 px images give 8x8 latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def _tiny_text_encoder() -> CLIPTextModel:
    return clip_text_encoder(hidden_size=32, intermediate_size=37, num_hidden_layers=2)


def clip_text_encoder(hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                      num_attention_heads: int = 4) -> CLIPTextModel:
    """A small CLIP text encoder over the real 49,408-token vocabulary, fresh weights from the global RNG.

    Token ids match the real tokenizer, so pooling finds the real end-of-text token.
    """
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
        hidden_act="quick_gelu",
        projection_dim=hidden_size,
    )
    return CLIPTextModel(config)


def _tokenizer_cache_folder() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "rareaug" / "clip-tokenizer"


def _write_tokenizer_files(folder: Path) -> None:
    """Derive vocab.json and merges.txt exactly as OpenAI CLIP / open_clip's SimpleTokenizer do."""
    merges = _open_clip_merges()
    vocab = _clip_vocab(merges)
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RareaugError(f"{_bpe_path()}: gives {len(vocab)} CLIP tokens, not {CLIP_VOCAB_SIZE}; "
                           f"reinstall open_clip_torch")
    # Atomic, so a concurrent process or a Ctrl-C never leaves a half file that later loads as a broken tokenizer.
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    encoder = {token: i for i, token in enumerate(vocab)}
    atomic_write_text(folder / "vocab.json", json.dumps(encoder, ensure_ascii=False))


def _open_clip_merges() -> list[str]:
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")
    return lines[1 : _N_MERGES + 1]


def _clip_vocab(merges: list[str]) -> list[str]:
    byte_tokens = list(_bytes_to_unicode().values())
    vocab = byte_tokens + [token + "</w>" for token in byte_tokens]
    vocab += ["".join(merge.split()) for merge in merges]
    return vocab + ["<|startoftext|>", "<|endoftext|>"]


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's byte -> printable character map (copied: importing open_clip costs a second)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _bpe_path() -> Path:
    # Found without importing open_clip, which would pull in its whole model zoo.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RareaugError("the CLIP tokenizer needs open_clip_torch's vocabulary; pip install 'open_clip_torch>=2.20'")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RareaugError(f"{path}: missing from open_clip_torch; reinstall it (pip install 'open_clip_torch>=2.20')")
    return path

"""Which device a stage runs on, how records name it, and the reduced precision each stage computes in.

One home for these so that the stages (fit, generate, sweep) and the benchmarks agree without importing
each other.
"""
from __future__ import annotations

import contextlib
import platform

import torch

from .errors import RareaugError


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when one is visible, else the CPU; a named device that is not here is one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RareaugError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RareaugError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    return device


def device_label(device: torch.device) -> str:
    """How records name the device: the GPU's model, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def requested_device_label(requested: str) -> str:
    """The label of what `--device` asked for (`auto` included)."""
    return device_label(resolve_device(requested))


def amp_settings(device: torch.device) -> tuple[torch.dtype | None, bool]:
    """LoRA training: bf16 autocast where the GPU has it, fp16 with loss scaling otherwise, fp32 on the CPU."""
    if device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def sampling_dtype(device: torch.device) -> torch.dtype:
    """Sampling: the base model's weights in bf16 where the GPU has it, fp16 on other GPUs, fp32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def amp_context(dtype: torch.dtype | None):
    """CUDA autocast to `dtype` (from `amp_settings`), or nothing when it is None (the CPU)."""
    return torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()


def bf16_autocast(device: torch.device):
    """Classifier cells and the mini model's training: bf16 autocast on a GPU, full precision on the CPU."""
    return amp_context(torch.bfloat16 if device.type == "cuda" else None)

"""LoRA files: diffusers/peft key format, so `pipe.load_lora_weights(path)` loads what `fit` writes."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save

from ..io import atomic_write_bytes
from .bank import DEFAULT_TARGETS, LoRABank

UNET_PREFIX = "unet."
TEXT_PREFIX = "text_encoder."
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP text attention, as DataDream's reference


def to_diffusers_state(factors: dict[str, torch.Tensor], scale: float,
                       prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """{"<layer>.A", "<layer>.B"} -> diffusers keys. The alpha/rank scale is folded into lora_B, since
    diffusers reads a file without alphas as alpha = rank (scale 1): the loaded layer is then exact."""
    state = {}
    for key, value in factors.items():
        layer, _, part = key.rpartition(".")
        if part == "A":
            state[f"{prefix}{layer}.lora_A.weight"] = value.contiguous()
        else:
            state[f"{prefix}{layer}.lora_B.weight"] = (value * scale).contiguous()
    return state


def from_diffusers_state(state: dict[str, torch.Tensor], prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """The inverse for one model's keys, with the scale left folded into B (route with scale 1)."""
    factors = {}
    for key, value in state.items():
        if key.startswith(prefix):
            layer = key[len(prefix):].rsplit(".lora_", 1)[0]
            factors[f"{layer}.{'A' if '.lora_A.' in key else 'B'}"] = value
    return factors


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> None:
    """Atomic write; metadata values become strings (safetensors' header holds str -> str)."""
    header = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=header))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(str(path)), metadata


def bank_from_lora_files(model, paths: list[Path], targets=None, prefix: str = UNET_PREFIX):
    """A bank with one slot per diffusers LoRA file (LoFT, DataDream), scale folded in (alpha = rank).
    None when the files hold no LoRA for this model (e.g. no text-encoder LoRA)."""
    factors = [from_diffusers_state(load_file(str(path)), prefix) for path in paths]
    if not factors[0]:
        return None
    rank = next(v for k, v in factors[0].items() if k.endswith(".A")).shape[0]
    targets = targets or (TEXT_TARGETS if prefix == TEXT_PREFIX else DEFAULT_TARGETS)
    bank = LoRABank(model, n_a=len(paths), rank=rank, alpha=float(rank), targets=targets)
    for slot, state in enumerate(factors):
        bank.set_slot(state, slot)
    return bank


def bank_from_chimera_file(model, path: Path, targets=None):
    """A bank with the class's shared A (slot 0) and every B head (slots in the file's head order)."""
    tensors, metadata = read_safetensors(path)
    heads = json.loads(metadata["heads"])
    rank = next(v for k, v in tensors.items() if k.endswith(".A")).shape[0]
    bank = LoRABank(model, n_a=1, n_b=len(heads), rank=rank, alpha=float(rank), targets=targets or DEFAULT_TARGETS)
    with torch.no_grad():
        for name, layer in bank.layers.items():
            layer.lora_A[0] = tensors[f"{name}.A"]
            layer.lora_B.copy_(tensors[f"{name}.B"])
    return bank, heads

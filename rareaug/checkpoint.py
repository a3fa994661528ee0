"""Training state on disk without pickle: tensors in safetensors, everything else as JSON in its metadata.

`torch.save` pickles, and unpickling a file planted in a shared run or work folder runs its code. A checkpoint
here is a nested structure of dicts, lists, numbers, strings and tensors (an optimizer's `state_dict()`, a
generator's state, a step count); the tensors are stored flat by their path and the rest as a JSON skeleton.
safetensors has no nested format and torch's `weights_only` loader still parses pickle, hence this small module.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from .errors import RareaugError
from .io import atomic_write_bytes

_TENSOR = "__tensor__"


def save_checkpoint(path: Path, state: Any) -> None:
    """Write `state` atomically: a stopped write leaves the previous checkpoint as it was."""
    tensors: dict[str, torch.Tensor] = {}

    def split(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().to("cpu").contiguous()
            return {_TENSOR: key}
        if isinstance(value, dict):
            return {"dict": [[split(k, f"{key}.k{i}"), split(v, f"{key}.{i}")]
                             for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (list, tuple)):
            return {"list": [split(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot checkpoint a {type(value).__name__} at {key}")

    skeleton = split(state, "s")
    atomic_write_bytes(Path(path), save(tensors, metadata={"rareaug_checkpoint": json.dumps(skeleton)}))


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> Any:
    """Read what `save_checkpoint` wrote; anything else (a pickle, a damaged file) is refused in one line."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path), device=str(device))
        skeleton = json.loads(metadata["rareaug_checkpoint"])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise RareaugError(f"{path}: not a rareaug checkpoint (unreadable, damaged, or another format such as a "
                           f"pickle, which is never loaded); delete it to start that part again") from error

    def join(value: Any) -> Any:
        if isinstance(value, dict):
            if _TENSOR in value:
                return tensors[value[_TENSOR]]
            if "dict" in value:
                return {join(k): join(v) for k, v in value["dict"]}
            return [join(v) for v in value["list"]]
        return value

    return join(skeleton)

"""Base models adapted to a user's domain by `rareaug adapt`: the files of `RUN/adapted/<variant>/`, and how
`--base-model adapted[:<variant>]` loads one.

```
RUN/adapted/<variant>/
  adapted.json                 conditioning, the base it adapts (+ weights hash), folds, images, unlabeled counts
  latents.safetensors          VAE posteriors of every image it trains on (a cache)
  [f<k>/]                      with --folds K one part per fold: the base adapted on the images outside fold k
    pytorch_lora_weights.safetensors   the UNet's LoRA in diffusers' format (`load_lora_weights`), or
    unet/                              the whole fine-tuned UNet (--rank 0)
    tokens/<j>.safetensors             language-free pseudo-tokens, one textual-inversion file each
    losses.csv, checkpoint.safetensors (while unfinished), done.json (once finished)
```

An adapted model is stored as a delta on its base (a LoRA and tokens, not a copy of the model), so a run holds
one per fold at a few MB each; loading fuses the LoRA into the UNet, so later stages see a plain SD model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import RareaugError

ADAPTED = "adapted"
LORA_FILE = "pytorch_lora_weights.safetensors"
META_FILE = "adapted.json"
DONE_FILE = "done.json"


def is_adapted(spec: str | None) -> bool:
    return bool(spec) and (spec == ADAPTED or spec.startswith(ADAPTED + ":"))


def finished_variants(root: Path) -> list[str]:
    """Variants whose every part finished (adapted.json is written last)."""
    return sorted(path.parent.name for path in root.glob(f"*/{META_FILE}")) if root.is_dir() else []


def resolve_adapted(root: Path, spec: str) -> str:
    """`adapted` or `adapted:<variant>` -> `adapted:<variant>`; bare `adapted` only when the run has one."""
    variants = finished_variants(root)
    name = spec.partition(":")[2]
    listed = ", ".join(f"adapted:{v}" for v in variants) or "none"
    if not variants:
        raise RareaugError(f"--base-model {spec}: {root.parent} has no finished adapted model; run `rareaug adapt "
                           f"--run {root.parent}` first")
    if not name:
        if len(variants) > 1:
            raise RareaugError(f"--base-model adapted: {root.parent} has {len(variants)} adapted models; name one "
                               f"({listed})")
        name = variants[0]
    if name not in variants:
        raise RareaugError(f"--base-model {spec}: no finished adapted model of that name in {root}; choose one of "
                           f"{listed}")
    return f"{ADAPTED}:{name}"


def read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as error:
        raise RareaugError(f"{folder / META_FILE}: unreadable ({error}); rerun `rareaug adapt` with --force") from None


def part_folder(folder: Path, folds: int, fold: int | None) -> Path:
    """The part a fold uses: the variant folder itself without folds, `f<k>/` with them."""
    if folds <= 1:
        return folder
    if fold is None:
        raise RareaugError(f"{folder.name} was adapted once per fold ({folds} folds): this stage needs a fold "
                           f"(generate --fold K; fit picks each fold's part itself)")
    return folder / f"f{fold}"


def load_adapted(root: Path, spec: str, fold: int | None, device, dtype):
    """The adapted base of `fold` as a frozen `BaseModel`, its LoRA fused and its pseudo-tokens installed."""
    from .base import frozen_base_model, load_base_model

    name = resolve_adapted(root, spec)
    folder = root / name.partition(":")[2]
    meta = read_meta(folder)
    part = part_folder(folder, meta["folds"], fold)
    base = load_base_model(meta["base_model"], device="cpu", dtype=torch.float32)
    if meta.get("base_model_hash") and base.weights_hash != meta["base_model_hash"]:
        raise RareaugError(f"{folder}: it adapted {meta['base_model_label']} with weights {meta['base_model_hash']}, "
                           f"but {meta['base_model']} now has weights {base.weights_hash}; restore that model, or "
                           "adapt again in a new --run")
    apply_part(base, part)
    components = {"unet": base.unet, "vae": base.vae, "text_encoder": base.text_encoder,
                  "tokenizer": base.tokenizer, "scheduler": base.scheduler}
    model = frozen_base_model(components, name, base.is_tiny, device, dtype)
    model.sampling_scheduler, model.revision = base.sampling_scheduler, base.revision
    return model


def apply_part(base, part: Path) -> None:
    """Fuse a part's UNet LoRA (or load its UNet) and add its pseudo-tokens, with diffusers' own loaders."""
    if not (part / DONE_FILE).is_file():
        raise RareaugError(f"{part}: this adapted model is unfinished; rerun `rareaug adapt` to finish it")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    pipe = base.pipeline()
    # Quiet for the load: diffusers warns that the file has no text-encoder keys (it has none) and transformers
    # how it initialises the new token rows (the loader overwrites them).
    verbosity = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        _load_part(pipe, base, part)
    finally:
        diffusers_logging.set_verbosity(verbosity[0])
        transformers_logging.set_verbosity(verbosity[1])


def _load_part(pipe, base, part: Path) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    if (part / "unet").is_dir():
        trained = UNet2DConditionModel.from_pretrained(part / "unet", local_files_only=True)
        base.unet.load_state_dict(trained.state_dict())
    else:
        pipe.load_lora_weights(str(part), weight_name=LORA_FILE, adapter_name=ADAPTED)
        pipe.fuse_lora(adapter_names=[ADAPTED])
        pipe.unload_lora_weights()
    token_files = sorted((part / "tokens").glob("*.safetensors"), key=lambda path: int(path.stem))
    if token_files:
        state_dicts = [load_file(path) for path in token_files]
        pipe.load_textual_inversion(state_dicts, token=[next(iter(sd)) for sd in state_dicts],
                                    tokenizer=base.tokenizer, text_encoder=base.text_encoder)

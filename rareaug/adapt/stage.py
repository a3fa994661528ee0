"""`rareaug adapt`: fine-tune the base model on the run's training images of every class (and unlabeled images of
the domain) before the per-image LoRAs, so that they start from a model that knows the domain.

With --folds K it adapts one model per fold, on the images outside that fold, as DataDream and Chimera are
fitted per fold: a fold's synthetic data then never comes from a model that saw its validation images.
Conditioning: `labels` (the recipe's prompt with each image's class), `domain` (one prompt for every image), or
`language-free` (Lafite2's pseudo text, see language_free.py).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from data_adapters import DecodeError

from .. import __version__
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import Config, stage_record
from ..device import amp_context, amp_settings, resolve_device
from ..errors import RareaugError, one_line
from ..images import model_input
from ..io import atomic_write_json, write_csv
from ..lora.files import read_safetensors, save_safetensors
from ..lora.store import model_label
from ..lora.train import unit_generator
from ..models.adapted import DONE_FILE, LORA_FILE, META_FILE, is_adapted, part_folder
from ..run_dir import EXECUTION_KEYS, RunDir, frozen_split, timed_stage
from ..split import SplitRow, fold_view
from . import language_free
from .unlabeled import UnlabeledImage, accepted, held_out_keys, scan_unlabeled

# The UNet layers a domain LoRA adapts: attention, its projections and the feed-forward (the per-image LoRAs
# adapt attention only); these names exist in every SD 1.x/2.x UNet.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
CHECKPOINT_FILE = "checkpoint.safetensors"


@dataclasses.dataclass
class AdaptResult:
    variant: str
    folder: Path
    trained: list[int]  # the folds (parts) trained now
    skipped: list[int]


@dataclasses.dataclass
class _Image:
    id: str
    path: Path
    mask: Path | None
    cls: str | None  # None for unlabeled images


@dataclasses.dataclass
class _Part:
    fold: int
    images: list[_Image]
    counts: dict


def variant_name(config: Config, salt: str, unlabeled_content: str = "") -> str:
    """The conditioning and a hash of everything that changes the adapted weights (the unlabeled images by their
    bytes, so a changed folder is another model)."""
    record = stage_record(config, salt)
    kept = {key: record[key] for key in ("seed", "recipe", "adapt")}
    kept["adapt"] = {k: v for k, v in kept["adapt"].items() if k not in EXECUTION_KEYS["adapt"]}
    kept["folds"] = config.split.folds
    if unlabeled_content:
        kept["unlabeled_content"] = unlabeled_content
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]
    return f"{config.adapt.conditioning}-{digest}"


@timed_stage(lambda config: "adapt", worked=lambda result: bool(result.trained))
def adapt(config: Config, given: set[str] = frozenset(), force: bool = False,
          console: Console | None = None) -> AdaptResult:
    from ..models import check_base_model_spec, load_base_model

    console = console or Console(stderr=True)
    # 1. The base, the split, the unlabeled images and the variant; a different config under the same name is
    #    refused. The batch size changes the weights (images per step), so it is resolved here and recorded.
    spec = config.adapt.base_model or config.fit.base_model
    if is_adapted(spec):
        raise RareaugError(f"--base-model {spec}: adapt starts from an original model; give the one it adapted")
    check_base_model_spec(spec)
    rows, config, _ = frozen_split(config, given)
    device = resolve_device(config.device)
    config = dataclasses.replace(config, adapt=dataclasses.replace(
        config.adapt, base_model=spec,
        batch_size=config.adapt.batch_size or _default_batch_size(device, config.recipe.resolution)))
    run = RunDir(config.run_dir())
    unlabeled, counts = (scan_unlabeled(config.adapt.unlabeled, run.path, config.data.frame) if config.adapt.unlabeled
                         else ([], {"unreadable": 0, "content": ""}))
    variant = variant_name(config, run.salt, counts["content"])
    folder = run.adapted(variant)
    if run.check_stage_config("adapt", variant, config, force=force) and folder.exists():
        shutil.rmtree(folder)  # --force: nothing of the old config may mix in
    # 2. Each fold's images: the labelled training images of every class, plus the unlabeled ones that copy
    #    none of the fold's validation or test images.
    parts, unlabeled_counts = _plan_parts(rows, config, unlabeled, counts)
    todo = [part for part in parts if not (part_folder(folder, config.split.folds, part.fold) / DONE_FILE).is_file()]
    skipped = [part.fold for part in parts if part not in todo]
    if not todo:
        if not (folder / META_FILE).is_file():  # stopped after its last part, before adapted.json
            _write_meta(folder, variant, config, parts, unlabeled_counts)
        console.print(f"adapt {variant}: already adapted in {folder}")
        return AdaptResult(variant, folder, [], skipped)
    # 3. The base model and the latents of every image (cached in the variant's folder).
    base = load_base_model(spec, device=device, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    run.write_stage_config("adapt", variant, config)
    images = list({image.id: image for part in parts for image in part.images}.values())
    latents = _encode(base, images, config, folder, device)
    is_tiny, base_hash = base.is_tiny, base.weights_hash  # every part adapts the same base: hashed once
    # 4. Train each fold's part, resumable from its checkpoint.
    total = sum(config.adapt.steps for _ in todo)
    progress = Progress(TextColumn(f"adapt {variant}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[loss]}"), TimeRemainingColumn(), console=console)
    trained = []
    with progress:
        task = progress.add_task("adapt", total=total, loss="")
        for part in todo:
            if base is None:
                base = load_base_model(spec, device=device, dtype=torch.float32)
            out = part_folder(folder, config.split.folds, part.fold)
            _train_part(base, base_hash, part, latents, config, variant, out, device,
                        lambda loss: progress.update(task, advance=1, loss=f"loss {loss:.4f}"))
            base = None  # the UNet now carries this part's adapter: the next part starts from a fresh copy
            trained.append(part.fold)
    # 5. adapted.json last: it marks the variant finished for --base-model adapted.
    _write_meta(folder, variant, config, parts, unlabeled_counts)
    console.print(f"adapt {variant}: adapted {config.adapt.conditioning} on {len(images)} image(s), "
                  f"{len(trained)} part(s) -> {folder}; use --base-model adapted:{variant}"
                  + (" [tiny test model: not a real model]" if is_tiny else ""))
    return AdaptResult(variant, folder, trained, skipped)


def _write_meta(folder: Path, variant: str, config: Config, parts: list[_Part], unlabeled_counts: dict) -> None:
    spec = config.adapt.base_model
    done = json.loads((part_folder(folder, config.split.folds, parts[0].fold) / DONE_FILE).read_text())
    local = Path(spec).expanduser()
    atomic_write_json(folder / META_FILE, {
        "variant": variant, "conditioning": config.adapt.conditioning,
        # a local model by its absolute path, so the run loads it from any working folder; its weights hash is
        # checked on every load
        "base_model": str(local.resolve()) if local.exists() else spec, "base_model_label": model_label(spec),
        "base_model_hash": done["base_model_hash"], "base_model_revision": done.get("base_model_revision", ""),
        "tiny_test_model": spec == "tiny",
        "folds": config.split.folds, "full_fine_tuning": config.adapt.rank == 0,
        "parts": [{"fold": part.fold, "labelled_images": sum(image.cls is not None for image in part.images),
                   "unlabeled_images": sum(image.cls is None for image in part.images)} for part in parts],
        "unlabeled": unlabeled_counts, "rareaug_version": __version__,
    })


def _plan_parts(rows: list[SplitRow], config: Config, unlabeled: list[UnlabeledImage],
                scan: dict) -> tuple[list[_Part], dict]:
    folds = config.split.folds
    counts: dict = {"found": len(unlabeled), "unreadable": scan["unreadable"], "parts": [],
                    **{key: scan[key] for key in ("synthetic", "in_rareaug_folders") if key in scan}}
    keys = held_out_keys(rows) if unlabeled else {}  # every row is held out in some fold, or in the test split
    parts = []
    for fold in range(folds):
        view = fold_view(rows, folds, fold)
        kept, refused = accepted(unlabeled, view.validate + view.test, keys) if unlabeled else ([], {"used": 0})
        counts["parts"].append({"fold": fold, **refused})
        images = ([_Image(row.id, row.abs_path, row.abs_mask, row.cls) for row in view.train]
                  + [_Image(image.id, image.path, None, None) for image in kept])
        parts.append(_Part(fold, images, counts["parts"][-1]))
    return parts, counts


def _encode(base, images: list[_Image], config: Config, folder: Path, device) -> dict[str, torch.Tensor]:
    """VAE posterior parameters of each image, cached by id (unlabeled ids follow the folder's sorted paths)."""
    cache = folder / "latents.safetensors"
    ids = [image.id for image in images]
    if cache.exists():
        tensors, metadata = read_safetensors(cache)
        if metadata.get("ids") == ",".join(ids):
            return dict(zip(ids, tensors["posteriors"]))
    posteriors = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            pixels = _pixels(images[start:start + 64], config)
            posteriors.append(base.vae.encode(pixels.to(device)).latent_dist.parameters.float().cpu())
    stacked = torch.cat(posteriors)
    save_safetensors(cache, {"posteriors": stacked}, {"ids": ",".join(ids)})
    return dict(zip(ids, stacked))


def _pixels(images: list[_Image], config: Config) -> torch.Tensor:
    """Model inputs by the recipe's crop rule; a file that stopped decoding since it was checked is one line."""
    recipe = config.recipe
    try:
        return torch.stack([model_input(image.path, recipe.resolution, recipe.crop, recipe.fallback_crop, image.mask,
                                        config.data.frame) for image in images])
    except DecodeError as error:
        raise RareaugError(f"{one_line(error)}; it decoded when the run was made: restore the file, or start a new "
                           "--run") from None


def _prompts(base, part: _Part, config: Config, out: Path, device, generator) -> tuple[list[str], list[str]]:
    """Each image's prompt and the pseudo-tokens it needs (language-free: made once, saved, reused on resume)."""
    adapt, recipe = config.adapt, config.recipe
    if adapt.conditioning == "labels":
        return [recipe.prompt.replace("{class}", image.cls) if image.cls else adapt.domain_prompt
                for image in part.images], []
    if adapt.conditioning == "domain":
        return [adapt.domain_prompt] * len(part.images), []
    tokens_file, state_file = out / "tokens.json", out / "tokens-rng.safetensors"
    if not tokens_file.is_file():
        _make_tokens(base, part, config, out, device, generator, state_file)
    else:  # made by an earlier, stopped run: go on from the generator state they left
        generator.set_state(load_checkpoint(state_file)["generator"].cpu())
    record = json.loads(tokens_file.read_text())
    names = language_free.token_names(record["tokens"])
    return [recipe.prompt.replace("{class}", names[j]) for j in record["assignment"]], names


def _make_tokens(base, part: _Part, config: Config, out: Path, device, generator, state_file: Path) -> None:
    adapt, recipe = config.adapt, config.recipe
    clip = language_free.load_clip(adapt.clip_model, adapt.base_model, base.text_encoder).to(device)
    pixels = _pixels(part.images, config)
    features = language_free.image_features(clip, pixels, adapt.clip_model)
    bank = [recipe.prompt, adapt.domain_prompt] + _captions(adapt.captions)
    pseudo = language_free.make_pseudo_text(clip, base.tokenizer, features, recipe.prompt, bank, adapt.pseudo_tokens,
                                            adapt.token_steps, adapt.perturbation, generator, config.seed)
    (out / "tokens").mkdir(parents=True, exist_ok=True)
    for j, (name, embedding) in enumerate(zip(pseudo.names, pseudo.embeddings)):
        save_safetensors(out / "tokens" / f"{j}.safetensors", {name: embedding.contiguous()}, {})
    save_checkpoint(state_file, {"generator": generator.get_state()})  # before tokens.json, which marks them made
    # Words retrieved from --captions could be anything its text holds (names, in a report's text): withheld then.
    retrieved = (collections.Counter(pseudo.nearest_words).most_common(20) if not adapt.captions
                 else "withheld: --captions was given")
    atomic_write_json(out / "tokens.json", {
        "tokens": len(pseudo.names), "assignment": pseudo.assignment, "contrastive_loss": pseudo.loss,
        "alignment": language_free.alignment(clip, base.tokenizer, pseudo, recipe.prompt, features),
        "retrieved_words": retrieved,
    })


def _captions(path: str | None) -> list[str]:
    if not path:
        return []
    try:
        return [line.strip() for line in Path(path).expanduser().read_text(encoding="utf-8").splitlines()
                if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise RareaugError(f"--captions {path}: unreadable ({error}); give a UTF-8 text file, one caption a "
                           "line") from None


class _Conditioner:
    """Prompt embeddings for a batch: cached per prompt, or (language-free) encoded each step with Lafite's
    perturbation of the pseudo-tokens; the empty prompt for the classifier-free-guidance share."""

    def __init__(self, base, prompts: list[str], tokens: list[str], out: Path, config: Config, device, generator):
        self.base, self.device, self.prompts = base, device, prompts
        self.tokenizer = language_free.tokenizer_with(base.tokenizer, tokens) if tokens else base.tokenizer
        self.module = None
        if tokens:
            from safetensors.torch import load_file

            extra = torch.stack([load_file(out / "tokens" / f"{j}.safetensors")[name]
                                 for j, name in enumerate(tokens)])
            self.module = language_free.PseudoTokenEmbedding(base.text_encoder.get_input_embeddings(), extra,
                                                             trainable=False)
            self.module.noise, self.module.generator = config.adapt.perturbation, generator
            base.text_encoder.set_input_embeddings(self.module)
        unique = list(dict.fromkeys(prompts)) + [""]  # the distinct prompts, then the empty one
        row = {prompt: i for i, prompt in enumerate(unique)}
        self.prompt_of = torch.tensor([row[prompt] for prompt in prompts] + [len(unique) - 1])
        self.ids = self._ids(unique)
        self.cached = None if tokens else self._encode(self.ids)  # labels / domain: a few prompts, encoded once

    def _ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.base.text_encoder(ids[start:start + 256].to(self.device))[0]
                              for start in range(0, len(ids), 256)])

    def __call__(self, index: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """The states of images `index`; those with `drop` get the empty prompt's."""
        rows = self.prompt_of[torch.where(drop, torch.full_like(index, len(self.prompts)), index)]
        return self.cached[rows.to(self.cached.device)] if self.cached is not None else self._encode(self.ids[rows])

    def close(self) -> None:
        if self.module is not None:
            self.base.text_encoder.set_input_embeddings(self.module.table)


def _trainable(base, rank: int, generator: torch.Generator) -> list[torch.nn.Parameter]:
    if rank == 0:
        base.unet.requires_grad_(True)
    else:
        from peft import LoraConfig

        # peft draws the LoRA's A from the global RNG: seeded from the part's generator, so a run (and its resume)
        # starts from the same weights whatever ran before it in the process.
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                             target_modules=LORA_TARGETS))
    return [parameter for parameter in base.unet.parameters() if parameter.requires_grad]


def _train_part(base, base_hash: str, part: _Part, latents: dict, config: Config, variant: str, out: Path, device,
                on_step) -> None:
    adapt = config.adapt
    out.mkdir(parents=True, exist_ok=True)
    generator = unit_generator(config.seed, f"adapt:{variant}:f{part.fold}")
    prompts, tokens = _prompts(base, part, config, out, device, generator)
    conditioner = _Conditioner(base, prompts, tokens, out, config, device, generator)
    params = _trainable(base, adapt.rank, generator)
    names = [name for name, parameter in base.unet.named_parameters() if parameter.requires_grad]
    lr = adapt.lr or (1e-4 if adapt.rank else 1e-5)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda step: min(1.0, (step + 1) / (adapt.warmup_steps + 1)))
    amp_dtype, _ = amp_settings(device)
    if device.type == "cuda" and config.recipe.resolution >= 256:
        base.unet.enable_gradient_checkpointing()
    base.unet.train()
    posteriors = torch.stack([latents[image.id] for image in part.images]).to(device)
    scaling, scheduler = float(base.vae.config.scaling_factor), base.scheduler
    batch = adapt.batch_size
    step, losses = 0, []
    checkpoint = out / CHECKPOINT_FILE
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, device)
        with torch.no_grad():
            for name, parameter in zip(names, params):
                parameter.copy_(state["params"][name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"].cpu())
        step, losses = state["step"], state["losses"]
        for _ in range(step):
            on_step(losses[-1] if losses else float("nan"))
    while step < adapt.steps:
        index = torch.randint(len(part.images), (batch,), generator=generator)
        # diffusers' train_text_to_image order of draws: posterior sample, noise, timesteps (then the CFG drop)
        clean = DiagonalGaussianDistribution(posteriors[index.to(device)]).sample(generator) * scaling
        noise = torch.randn(clean.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(device)
        drop = torch.rand(batch, generator=generator) < adapt.uncond_prob
        noisy = scheduler.add_noise(clean, noise, timesteps)
        target = noise if base.prediction_type == "epsilon" else scheduler.get_velocity(clean, noise, timesteps)
        states = conditioner(index, drop)
        with amp_context(amp_dtype):
            prediction = base.unet(noisy, timesteps, states).sample
        loss = F.mse_loss(prediction.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        losses.append(float(loss.detach()))
        on_step(losses[-1])
        if step % adapt.checkpoint_every == 0 and step < adapt.steps:
            save_checkpoint(checkpoint, {"step": step, "losses": losses, "generator": generator.get_state(),
                                         "params": dict(zip(names, params)), "optimizer": optimizer.state_dict(),
                                         "schedule": schedule.state_dict()})
    conditioner.close()
    base.unet.eval()
    _save_part(base, adapt.rank, out)
    write_csv(out / "losses.csv", ("step", "loss"), [[i + 1, f"{value:.6g}"] for i, value in enumerate(losses)])
    tail = losses[-min(50, len(losses)):]
    atomic_write_json(out / DONE_FILE, {"steps": step, "final_loss": sum(tail) / len(tail), "images": len(part.images),
                                        "tokens": len(tokens), **part.counts, "base_model_hash": base_hash,
                                        "base_model_revision": base.revision or "", "finished": time.time()})
    checkpoint.unlink(missing_ok=True)


def _save_part(base, rank: int, out: Path) -> None:
    if rank == 0:
        base.unet.save_pretrained(out / "unet")
        return
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    # peft's own keys (lora_A / lora_B), as fit writes them: diffusers' convert_state_dict_to_diffusers turns only
    # the attention layers into the old lora.down / lora.up names, and the loader then drops those layers.
    layers = get_peft_model_state_dict(base.unet)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, weight_name=LORA_FILE)


def _default_batch_size(device, resolution: int) -> int:
    if device.type != "cuda":
        return 16
    return max(1, min(256, int(32 * (512 / resolution) ** 2)))

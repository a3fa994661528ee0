"""`rareaug fit`: train the LoRAs of one method on the rare class's training images, all in one bank."""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from . import distributed
from .config import Config, resolved_fit
from .device import amp_settings, resolve_device
from .errors import RareaugError
from .images import boosted_inputs, model_input
from .io import atomic_write_text
from .lora.bank import LoRABank
from .lora.files import TEXT_TARGETS, read_safetensors, save_safetensors
from .lora.store import (
    checkpoint_folder,
    clear_checkpoints,
    clear_outputs,
    finished_units,
    merge_shards,
    resumed_batch_size,
    safe_name,
    save_job,
)
from .lora.train import Job, JobRunner, TrainData, checkpoint_path, unit_generator
from .models.adapted import is_adapted, resolve_adapted
from .run_dir import RunDir, frozen_split, timed_stage
from .split import SplitRow, fold_view, lora_images


@dataclasses.dataclass
class FitResult:
    method: str
    out_dir: Path
    trained: list[str]
    skipped: list[str]
    adapter_steps_per_s: float | None


def same_model_as_other_fits(config: Config, given: set[str]) -> Config:
    """Methods side by side in one run are compared on one base model and resolution: a method fitted
    without --base-model / --resolution takes those of the run's earlier fits."""
    try:
        run = RunDir(config.run_dir())
    except RareaugError:  # no --run and no --rare: there is no run to look in yet
        return config
    earlier = sorted(run.path.glob("stages/fit-*.yaml"), key=lambda path: path.stat().st_mtime)
    if not earlier:
        return config
    stored = yaml.safe_load(earlier[0].read_text())
    fit, recipe = config.fit, config.recipe
    if "fit.base_model" not in given:
        fit = dataclasses.replace(fit, base_model=stored["fit"]["base_model"])
    if "recipe.resolution" not in given:
        recipe = dataclasses.replace(recipe, resolution=stored["recipe"]["resolution"])
    return dataclasses.replace(config, fit=fit, recipe=recipe)


@timed_stage(lambda config: f"fit {config.fit.method}", worked=lambda result: bool(result.trained))
def fit(config: Config, given: set[str] = frozenset(), force: bool = False,
        console: Console | None = None) -> FitResult:
    """Under `accelerate launch` / `torchrun`, each process trains its share of the LoRAs (see distributed.py)."""
    from .models import check_base_model_spec, load_base_model

    console = console or Console(stderr=True)
    # 1. Check inputs before any model is loaded.
    config = same_model_as_other_fits(config, given)
    fit_config = resolved_fit(config)
    check_base_model_spec(fit_config.base_model)
    if is_adapted(fit_config.base_model):  # bare `adapted` is recorded as the variant it means
        fit_config = dataclasses.replace(fit_config, base_model=resolve_adapted(
            RunDir(config.run_dir()).adapted_root, fit_config.base_model))
    distributed.setup(config.device)
    device = resolve_device(distributed.local_device(config.device))

    # 2. The frozen split and the images to train on.
    with distributed.main_first():
        rows, config, _ = frozen_split(config, given)
    train = lora_images(rows, config.split.folds)
    if len(train) < 2:
        raise RareaugError(f"{RunDir(config.run_dir()).split_csv}: only {len(train)} rare training image(s); "
                           "LoFT fuses pairs, so at least 2 are needed (add images or lower --val-fraction)")
    config = dataclasses.replace(config, fit=fit_config)

    # 3. The stage config, written before work starts; a different config for this method is refused.
    run = RunDir(config.run_dir())
    method = fit_config.method
    out_dir = run.loras(method)
    with distributed.main_first():
        start_over = run.check_stage_config("fit", method, config, force=force)
        out_dir.mkdir(parents=True, exist_ok=True)
    # An adapted base adapted per fold is a different model in each fold: every LoRA is then fitted per fold.
    per_fold = is_adapted(fit_config.base_model) and config.split.folds > 1
    jobs_all = plan_jobs(method, train, config.split.folds, per_fold)
    done = set() if start_over else finished_units(out_dir, fit_config.steps)
    pending = [job for job in jobs_all if not all(unit in done for unit in job.units)]
    skipped = sorted({unit for job in jobs_all for unit in job.units} - {u for j in pending for u in j.units})
    if not pending:
        distributed.barrier()
        if distributed.is_main():
            merge_shards(out_dir)  # a multi-process fit stopped after its last LoRA, before its merge
            console.print(f"fit {method}: all {len(skipped)} LoRA(s) already trained in {out_dir}")
        return FitResult(method, out_dir, [], skipped, None)
    jobs = distributed.shard(pending)  # every pending job on one process; LoRAs never depend on each other

    # 4. Load the base model; encode images and prompts once (cached in the run dir).
    amp_dtype = amp_settings(device)[0]
    # A process left without jobs still loads a model and meets every barrier (on the first pending fold's base).
    groups = (_by_fold(jobs) or {next(iter(_by_fold(pending))): []}) if per_fold else {None: jobs}
    first_fold = next(iter(groups))
    base = load_base_model(fit_config.base_model, device=device, dtype=amp_dtype or torch.float32, run=run.path,
                           fold=first_fold)
    distributed.barrier()  # every process has read what was there before rank 0 clears it
    if distributed.is_main():
        if start_over:
            clear_outputs(out_dir)  # --force with a new config: LoRAs of the old one must not mix in
        run.write_stage_config("fit", method, config)
    with distributed.main_first():
        data = encode_training_set(base, train, config, run, device)
    if method == "chimera" and fit_config.semantic_boost and distributed.is_main():
        boosted = len(data.views())  # the fallback, said once: images without a mask box train A on their crop
        console.print(f"fit chimera: semantic boosting on {boosted} of {len(train)} image(s)"
                      + ("" if boosted == len(train) else "; without a mask box the rest train A on their standard "
                                                          "crop only"))

    # 5. Train this process's jobs in one bank, LoFT's adapters batch_size at a time (each fold on its own
    #    adapted base when there is one per fold).
    checkpoints = checkpoint_folder(out_dir)
    batch_file = checkpoints / ("batch_size" if distributed.world_size() == 1 else f"batch_size.{distributed.rank()}")
    batch_size = (fit_config.batch_size or resumed_batch_size(batch_file)
                  or default_batch_size(device, method, len(train)))
    checkpoints.mkdir(exist_ok=True)
    atomic_write_text(batch_file, f"{batch_size}\n")
    trained, rate = [], 0.0
    for fold, fold_jobs in groups.items():
        if fold != first_fold:
            base = load_base_model(fit_config.base_model, device=device, dtype=amp_dtype or torch.float32,
                                   run=run.path, fold=fold)
        fold_jobs = regroup_loft(fold_jobs, batch_size) if method == "loft" else fold_jobs
        done_now, rate_now = (_train_jobs(fold_jobs, base, data, train, config, device, batch_size, out_dir, console)
                              if fold_jobs else ([], 0.0))
        trained, rate = trained + done_now, max(rate, rate_now)

    # 6. Rank 0 folds every process's index and loss shards into index.csv and losses.csv.
    distributed.barrier()
    if distributed.is_main():
        merge_shards(out_dir)
        clear_checkpoints(out_dir)  # every job is done: what is left belongs to chunkings no longer used
    distributed.barrier()
    trained_all = [unit for part in distributed.gather(trained) for unit in part]
    rates = distributed.gather(rate)  # adapter-steps/s of each process; together they are the run's
    if distributed.is_main():
        console.print(f"fit {method}: trained {len(trained_all)} LoRA(s), skipped {len(skipped)} already done "
                      f"-> {out_dir}"
                      + (f" ({distributed.world_size()} processes)" if distributed.world_size() > 1 else "")
                      + (" [tiny test model: not a real model]" if base.is_tiny else ""))
    return FitResult(method, out_dir, trained_all, skipped, sum(rates))


def _train_jobs(jobs: list[Job], base, data: TrainData, train: list[SplitRow], config: Config, device: torch.device,
                batch_size: int, out_dir: Path, console: Console) -> tuple[list[str], float]:
    """This process's jobs, one after another in one bank; returns the units trained and adapter-steps/s."""
    fit_config, method = config.fit, config.fit.method
    n_b = len(train) if method == "chimera" else (batch_size if method == "loft" else 1)
    bank = LoRABank(base.unet, n_a=batch_size if method == "loft" else 1, n_b=n_b, rank=fit_config.rank,
                    alpha=fit_config.alpha, targets=tuple(fit_config.targets.split(",")))
    text_bank = None
    if fit_config.text_encoder_lora:
        base.text_encoder.to(device)
        text_bank = LoRABank(base.text_encoder, n_a=1, rank=fit_config.rank, alpha=fit_config.alpha,
                             targets=TEXT_TARGETS)
    if fit_config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    base.unet.requires_grad_(False)
    for parameter in bank.parameters() + (text_bank.parameters() if text_bank else []):
        parameter.requires_grad_(True)
    tracker = _Progress(console, jobs, fit_config.steps, method, show=distributed.is_main())
    runner = JobRunner(base.unet, bank, base.scheduler, data, fit_config, config.seed, device, batch_size,
                       checkpoint_dir=checkpoint_folder(out_dir), on_step=tracker.advance,
                       text_encoder=base.text_encoder, text_bank=text_bank)
    trained = []
    with tracker:
        for job in jobs:
            losses = runner.run(job)
            save_job(job, bank, losses, train, fit_config, base, out_dir, text_bank)
            checkpoint_path(checkpoint_folder(out_dir), job.key).unlink(missing_ok=True)
            trained += job.units
    return trained, tracker.rate()


def plan_jobs(method: str, train: list[SplitRow], folds: int = 1, per_fold: bool = False) -> list[Job]:
    """LoFT: one job per image (grouped into chunks later); folds only restrict which pairs are fused.
    The class methods: one job for the class — with folds, one per fold on the images outside it, since a
    class-level LoRA trained on fold k's images would leak them into fold k's synthetic data.
    `per_fold` (a base adapted per fold): LoFT too fits each image once per fold that may use it, `<id>-f<k>`."""
    if method == "loft" and per_fold:
        index = {row.id: i for i, row in enumerate(train)}
        return [Job("loft", f"loft-{row.id}-f{k}", [f"{row.id}-f{k}"], [index[row.id]])
                for k in range(folds) for row in fold_view(train, folds, k).rare_train]
    if method == "loft":
        return [Job("loft", f"loft-{row.id}", [row.id], [i]) for i, row in enumerate(train)]
    cls = train[0].cls
    if folds == 1:
        return [Job(method, f"{method}-{safe_name(cls)}", [cls], list(range(len(train))))]
    jobs = []
    for k in range(folds):
        outside = {row.id for row in fold_view(train, folds, k).rare_train}
        jobs.append(Job(method, f"{method}-{safe_name(cls)}-f{k}", [f"{cls}-f{k}"],
                        [i for i, row in enumerate(train) if row.id in outside]))
    return jobs


def _by_fold(jobs: list[Job]) -> dict[int, list[Job]]:
    """Jobs by the fold their units belong to (`...-f<k>`), in fold order."""
    groups: dict[int, list[Job]] = {}
    for job in jobs:
        groups.setdefault(int(job.units[0].rsplit("-f", 1)[1]), []).append(job)
    return dict(sorted(groups.items()))


def regroup_loft(jobs: list[Job], batch_size: int) -> list[Job]:
    """Chunks of `batch_size` adapters that train together; the checkpoint name says which."""
    chunks = []
    for start in range(0, len(jobs), batch_size):
        part = jobs[start:start + batch_size]
        ids = [job.units[0] for job in part]
        chunks.append(Job("loft", f"loft-{ids[0]}-{ids[-1]}-{len(ids)}", ids, [job.images[0] for job in part]))
    return chunks


def default_batch_size(device: torch.device, method: str, n_images: int) -> int:
    """Samples per UNet pass when --batch-size is not given: the GPU's free memory decides.

    Measured on an H200 (ANCHORS.md): about 1.1 GiB per adapter sample at 512 px without gradient
    checkpointing; we keep a quarter of the free memory spare.
    """
    want = n_images if method == "loft" else 8
    if device.type != "cuda":
        return max(1, min(want, 8))
    free, _ = torch.cuda.mem_get_info(device)
    fit_in_memory = int((free * 0.75 - 4 * 2**30) / (1.1 * 2**30))
    return max(1, min(want, fit_in_memory, 64))


BOOSTED_VIEWS = 4  # Chimera's semantic boosting: random crops per image that keep its mask's box whole


def encode_training_set(base, train: list[SplitRow], config: Config, run: RunDir, device: torch.device) -> TrainData:
    """VAE posteriors and prompt embeddings, computed once and cached; then the VAE and text encoder
    leave the GPU, since training needs neither. Chimera with semantic boosting adds its boosted views."""
    data = _encode_standard(base, train, config, run, device)
    if config.fit.method == "chimera" and config.fit.semantic_boost:
        data.boosted, data.boosted_rows = _encode_boosted(base, train, config, run, device)
    return data


def _encode_standard(base, train: list[SplitRow], config: Config, run: RunDir, device: torch.device) -> TrainData:
    recipe = config.recipe
    key = hashlib.sha256(f"{config.fit.base_model}|{recipe.resolution}|{recipe.crop}|{recipe.fallback_crop}|"
                         f"{recipe.prompt}".encode()).hexdigest()[:12]
    cache = run.train_cache(key)
    ids = [row.id for row in train]
    if cache.exists():
        tensors, metadata = read_safetensors(cache)
        if metadata.get("ids") == ",".join(ids):
            return TrainData(ids, tensors["posteriors"].to(device), tensors["embeds"].to(device),
                             float(metadata["scaling_factor"]), tensors["token_ids"])
    base.vae.to(device)
    base.text_encoder.to(device)
    posteriors = []
    with torch.no_grad():
        for row in train:
            pixels = model_input(row.abs_path, recipe.resolution, recipe.crop, recipe.fallback_crop, row.abs_mask,
                                 config.data.frame)
            posteriors.append(
                base.vae.encode(pixels[None].to(device, base.vae.dtype)).latent_dist.parameters.float().cpu())
        prompts = {row.cls: recipe.prompt.replace("{class}", row.cls) for row in train}
        tokens = {cls: _tokens(base, prompt) for cls, prompt in prompts.items()}
        embedded = {cls: base.text_encoder(ids.to(device))[0].float().cpu() for cls, ids in tokens.items()}
    base.vae.to("cpu")
    base.text_encoder.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    posterior_tensor = torch.cat(posteriors)
    embeds = torch.cat([embedded[row.cls] for row in train])
    token_ids = torch.cat([tokens[row.cls] for row in train])
    scaling = float(base.vae.config.scaling_factor)
    save_safetensors(cache, {"posteriors": posterior_tensor, "embeds": embeds, "token_ids": token_ids},
                     {"ids": ",".join(ids), "scaling_factor": str(scaling)})
    return TrainData(ids, posterior_tensor.to(device), embeds.to(device), scaling, token_ids)


def _encode_boosted(base, train: list[SplitRow], config: Config, run: RunDir,
                    device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """BOOSTED_VIEWS posteriors per image with a non-empty mask (`images.boost_squares`, seeded by (seed, image
    id)) and the row each belongs to; (None, None) when no image has one. Cached apart from the standard
    posteriors, which every method shares."""
    key = hashlib.sha256(f"{config.fit.base_model}|{config.recipe.resolution}|boost-v1|{BOOSTED_VIEWS}|"
                         f"{config.seed}|{config.data.frame}".encode()).hexdigest()[:12]
    cache = run.train_cache(f"boost-{key}")
    ids = [row.id for row in train]
    if cache.exists():
        tensors, metadata = read_safetensors(cache)
        if metadata.get("ids") == ",".join(ids):
            return tensors["posteriors"].to(device), tensors["rows"]
    views = [(i, boosted_inputs(row.abs_path, row.abs_mask, config.recipe.resolution, BOOSTED_VIEWS,
                                unit_generator(config.seed, f"boost-views:{row.id}"), config.data.frame))
             for i, row in enumerate(train)]
    views = [(i, pixels) for i, pixels in views if pixels]
    if not views:
        return None, None
    base.vae.to(device)
    with torch.no_grad():
        posteriors = torch.cat([base.vae.encode(torch.stack(pixels).to(device, base.vae.dtype))
                                .latent_dist.parameters.float().cpu() for _, pixels in views])
    base.vae.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows = torch.tensor([i for i, pixels in views for _ in pixels], dtype=torch.long)
    save_safetensors(cache, {"posteriors": posteriors, "rows": rows}, {"ids": ",".join(ids)})
    return posteriors.to(device), rows


def _tokens(base, prompt: str) -> torch.Tensor:
    return base.tokenizer(prompt, padding="max_length", max_length=base.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids


class _Progress:
    """A rich progress bar over adapter-steps, showing LoRAs done, adapter-steps/s and the ETA."""

    def __init__(self, console: Console, jobs: list[Job], steps: int, method: str, show: bool = True):
        self.units_total = sum(len(job.units) for job in jobs)
        self.progress = Progress(TextColumn(f"fit {method}"), BarColumn(),
                                 TextColumn("{task.fields[done]}/{task.fields[units]} LoRAs"),
                                 TextColumn("{task.fields[rate]} adapter-steps/s"), TimeRemainingColumn(),
                                 console=console, disable=not show)
        self.steps = steps
        self.task = self.progress.add_task("fit", total=self.units_total * steps, done=0, units=self.units_total,
                                           rate="-")
        self.adapter_steps, self.units_done, self.started = 0, 0, None

    def __enter__(self):
        self.progress.start()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def advance(self, job: Job, step: int, adapter_steps: int) -> None:
        self.adapter_steps += adapter_steps
        if step == self.steps:
            self.units_done += len(job.units)
        self.progress.update(self.task, advance=len(job.units), done=self.units_done, rate=f"{self.rate():.1f}")

    def rate(self) -> float:
        elapsed = time.perf_counter() - (self.started or time.perf_counter())
        return self.adapter_steps / elapsed if elapsed > 0 else 0.0

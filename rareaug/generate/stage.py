"""`rareaug generate`: fill a variant's ordered pool of synthetic images up to the asked count.

The pool is ordered and nested: slot i always mixes the same LoRAs with the same weights and seed, so
asking for more extends it and asking for fewer reuses its first kept images. Every slot is checked by the
memorization guard; a rejected image is replaced by the slot's next attempt (a new seed), at most
`max_attempts` times, after which the slot is recorded as rejected and the pool moves on.

Besides the LoRA methods: `classprompt` (the base model and the prompt), `img2img` (a real image noised to
`--strength` and denoised with the prompt, optionally on the class LoRA), `classic` (albumentations copies),
and for defect data `cutpaste` / `perlin` (a defect pasted onto a normal image, its mask saved in masks/).
"""
from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from data_adapters import decode

from .. import __version__, distributed
from ..config import (
    DEFECT_METHODS,
    LORA_METHODS,
    UNSAMPLED_METHODS,
    Config,
    FitConfig,
    GenerateConfig,
    check_img2img_steps,
)
from ..device import resolve_device, sampling_dtype
from ..errors import RareaugError
from ..images import model_input, model_input_with_mask
from ..io import atomic_write_json
from ..lora.files import TEXT_PREFIX, bank_from_chimera_file, bank_from_lora_files
from ..lora.store import finished_units, model_label, safe_name
from ..models.adapted import is_adapted, resolve_adapted
from ..run_dir import RunDir, frozen_split, timed_stage
from ..split import SplitRow, chosen_fold, fold_view
from . import defects, plans
from .classic import classic_copy
from .guard import Guard
from .manifest import MASKS, Manifest, image_file, is_kept, kept_rows, mask_file, save_mask, save_png
from .sampler import BankSampler, SampleRequest

MAX_REJECTED_IN_A_ROW = 20  # slots rejected one after another: the threshold does not fit, or the LoRAs copy


@dataclasses.dataclass
class GenerateResult:
    variant: str
    folder: Path
    kept: int
    rejected_slots: int
    rejected_attempts: int
    made_now: int
    images_per_s: float | None
    stopped: str | None = None  # why the guard stopped the pool short of the asked count


def variant_name(config: Config) -> str:
    """Method + the parameters that change the images, e.g. loft-l0.5-g2, chimera-kall-d1-g2, img2img-t0.5-g2,
    classic, cutpaste."""
    gen = config.generate
    if gen.method in UNSAMPLED_METHODS:
        parts = [gen.method]
    else:
        parts = [gen.method]
        if gen.method == "loft":
            parts.append(f"b{gen.beta_alpha:g}" if gen.beta_alpha is not None else f"l{gen.lam:g}")
        elif gen.method == "chimera":
            parts += [f"k{gen.k if gen.k else 'all'}", f"d{gen.dirichlet_alpha:g}"]
        elif gen.method == "img2img":
            parts += ([gen.lora] if gen.lora != "none" else []) + [f"t{gen.strength:g}"]
        base = gen.base_model or config.fit.base_model
        if is_adapted(base):  # the adapted model's variant, e.g. labels-d75bd073 (before g: names end in a setting)
            parts.append(base.partition(":")[2])
        parts.append(f"g{gen.guidance:g}")
        if gen.steps != 50:
            parts.append(f"s{gen.steps}")
        if gen.scheduler != "default":
            parts.append(gen.scheduler.replace("+", "p").lower())
    if gen.fold is not None:
        parts.append(f"f{gen.fold}")
    return "-".join(parts)


def target_count(config: Config, n_real: int) -> int:
    gen = config.generate
    if (gen.n is None) == (gen.ratio is None):
        raise RareaugError("say how many images: exactly one of --n N or --ratio R")
    return gen.n if gen.n is not None else int(round(gen.ratio * n_real))


@timed_stage(lambda config: f"generate {config.generate.method}", worked=lambda result: result.made_now > 0)
def generate(config: Config, given: set[str] = frozenset(), force: bool = False,
             console: Console | None = None) -> GenerateResult:
    console = console or Console(stderr=True)
    gen = config.generate
    # 1. The split, the source images, the variant and its stage config. Under `accelerate launch` /
    #    `torchrun` every process makes its share of the slots (see distributed.py); rank 0 goes first
    #    wherever the run's shared files are written.
    distributed.setup(config.device)
    with distributed.main_first():
        rows, config, _ = frozen_split(config, given)
    view = fold_view(rows, config.split.folds, chosen_fold(config.split.folds, gen.fold))
    sources = view.rare_train
    if len(sources) < 2 and gen.method in ("loft", "chimera"):
        raise RareaugError(f"only {len(sources)} real rare image(s) to fuse; at least 2 are needed")
    if not sources:
        raise RareaugError(f"no real rare training image to make {gen.method} images from in this split")
    normals = _normal_images(view.train, gen.method)
    target = target_count(config, len(sources))
    run = RunDir(config.run_dir())
    fit_stage = _fit_stage(run, gen.method, gen.lora)
    config = _with_fit_settings(_with_resolved_base(config, run), fit_stage)
    variant = variant_name(config)
    if gen.method == "img2img":  # the sweep sets the steps after the config was checked
        check_img2img_steps(gen.steps, gen.strength)
    # img2img's settings are recorded for img2img only: a sweep's --strength never changes another method's pool.
    img2img = {} if gen.method == "img2img" else {"strength": GenerateConfig.strength, "lora": GenerateConfig.lora}
    recorded = dataclasses.replace(config, generate=dataclasses.replace(gen, n=None, ratio=None, batch_size=None,
                                                                        **img2img))
    folder = run.pool(variant)
    manifest = Manifest(folder, worker=distributed.rank())
    with distributed.main_first():
        if run.check_stage_config("generate", variant, recorded, force=force) and distributed.is_main():
            _clear_pool(folder)  # --force with a new config: images of the old one must not mix in
        folder.mkdir(parents=True, exist_ok=True)

    # 2. What is there already: a pool whose first slots hold enough kept images is reused as it is.
    #    Missing slots among them (a run stopped while they waited for a retry) are made like new ones,
    #    so the pool's first images never depend on its history.
    done = manifest.rows()
    stopped = stop_reason(done, target)
    if not slots_to_make(done, target) or stopped:
        distributed.barrier()  # everyone has looked before rank 0 merges the shards
        if distributed.is_main():
            manifest.merge()
            console.print(f"generate {variant}: the pool already holds {len(kept_rows(done))} kept image(s) "
                          f"(asked {target}) in {folder}" + (f"; {escape(stopped)}" if stopped else ""), soft_wrap=True)
        return GenerateResult(variant, folder, len(kept_rows(done)), _rejected(done), 0, 0, None, stopped)

    # 3. The model, the bank with this variant's LoRAs, the fusion plan, the guard.
    device = resolve_device(distributed.local_device(config.device))
    maker = _ImageMaker(config, run, sources, normals, variant, device)
    guard = Guard(maker.reals, [row.id for row in sources], gen.guard_distance, gen.guard_rule, gen.guard_ratio,
                  gen.guard_threshold, device, leave_source_out=gen.method == "img2img")
    if gen.guard and gen.method not in UNSAMPLED_METHODS and gen.guard_rule == "relative" and guard.neighbours == 0:
        needed = 3 if gen.method == "img2img" else 2  # img2img leaves each image's own source out
        raise RareaugError("the relative memorization guard compares the nearest real image with the next ones: "
                           f"it needs at least {needed} real rare images; set --guard-threshold D or use --no-guard")
    distributed.barrier()
    if distributed.is_main():
        run.write_stage_config("generate", variant, recorded)

    # 4. Fill the pool in rounds. A slot's outcome (kept, or rejected after max_attempts) depends only on
    #    (seed, slot, attempt), so the pool is the first `target` kept slots in slot order however the
    #    slots are shared out: each round makes the slots still missing from the shortest prefix that could
    #    hold `target` kept images, each process its share, until no slot is missing.
    batch_size = gen.batch_size or _default_batch_size(device, maker.resolution)
    progress = Progress(TextColumn(f"generate {variant}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]} images/s"), TimeRemainingColumn(), console=console,
                        disable=not distributed.is_main())
    filler = _PoolFiller(maker, guard, manifest, folder, gen, batch_size, progress)
    started = time.perf_counter()
    with progress:
        filler.task = progress.add_task("generate", total=target, completed=len(kept_rows(done)), rate="-")
        while (missing := slots_to_make(done, target)) and not (stopped := stop_reason(done, target)):
            filler.fill(distributed.shard(missing))
            distributed.barrier()
            done = manifest.rows()
    seconds = time.perf_counter() - started

    # 5. Rank 0 merges the shards and summarises.
    made, rejected_attempts = (sum(values)
                               for values in zip(*distributed.gather((filler.made, filler.rejected_attempts))))
    result = GenerateResult(variant, folder, len(kept_rows(done)), _rejected(done), rejected_attempts, made,
                            made / seconds if seconds > 0 else None, stopped)
    if distributed.is_main():
        manifest.merge()
        atomic_write_json(folder / "summary.json", {
            "variant": variant, "method": gen.method, "asked": target, "kept": result.kept,
            "rejected_slots": result.rejected_slots, "rejected_attempts_this_run": rejected_attempts,
            "stopped_by_guard": stopped is not None, "stop_reason": stopped, "guard": gen.guard, **guard.record(),
            "real_images": len(sources), "base_model": maker.base_name, "base_model_revision": maker.base_revision,
            "base_model_hash": maker.base_hash, "tiny_test_model": maker.is_tiny,
            **({"strength": gen.strength, "lora": gen.lora} if gen.method == "img2img" else {}),
            **({"normal_images": len(normals)} if normals else {}),
            "rareaug_version": __version__,
        })
        judged = (f"{result.rejected_slots} slot(s) rejected, {rejected_attempts} attempt(s) retried or rejected by "
                  f"the guard ({guard.description})" if gen.method not in UNSAMPLED_METHODS
                  else "not guarded: edits of real images by design")
        console.print(f"generate {variant}: made {made}, kept {result.kept} in the pool, {judged} -> {folder}"
                      + (f" ({distributed.world_size()} processes)" if distributed.world_size() > 1 else "")
                      + (" [tiny test model: not a real model]" if maker.is_tiny else ""))
        if stopped:
            console.print(f"[yellow]generate {variant}: {escape(stopped)}[/]", highlight=False, soft_wrap=True)
    distributed.barrier()
    return result


def stop_reason(rows: list[dict], target: int) -> str | None:
    """One line when the pool holds a run of MAX_REJECTED_IN_A_ROW consecutive slots rejected as near-copies
    before it reached `target`: the LoRAs copy their images (or the guard does not fit the data), and going on
    would only burn compute. Read from the manifest, so a rerun stops at the same place instead of retrying."""
    if len(kept_rows(rows)) >= target:
        return None
    rejected = {int(row["pool_index"]) for row in rows if not is_kept(row)}
    for slot in sorted(rejected):
        if all(slot + k in rejected for k in range(MAX_REJECTED_IN_A_ROW)):
            return (f"the guard stopped the pool at {len(kept_rows(rows))} of {target} images: {MAX_REJECTED_IN_A_ROW} "
                    f"slots in a row (from slot {slot}) were near-copies of real images in every attempt; look at "
                    "their nearest real images in manifest.csv, then lower --guard-ratio if they are not copies, or "
                    "fit with fewer steps if they are (rerun with --force)")
    return None


def slots_to_make(rows: list[dict], target: int) -> list[int]:
    """The slots missing from the shortest prefix of the pool that holds `target` kept images once every
    missing slot in it is kept; empty when the pool already holds them."""
    kept_at = {int(row["pool_index"]): is_kept(row) for row in rows}
    missing, kept, slot = [], 0, 0
    while kept + len(missing) < target:
        if slot in kept_at:
            kept += kept_at[slot]
        else:
            missing.append(slot)
        slot += 1
    return missing


class _PoolFiller:
    """Makes given slots, each until it is kept or has used its attempts; writes this process's shard."""

    def __init__(self, maker, guard: Guard, manifest: Manifest, folder: Path, gen, batch_size: int, progress):
        self.maker, self.guard, self.manifest, self.folder, self.gen = maker, guard, manifest, folder, gen
        self.batch_size, self.progress, self.task = batch_size, progress, None
        self.made = self.rejected_attempts = 0
        self.started = time.perf_counter()

    def fill(self, slots: list[int]) -> None:
        """Stops early after MAX_REJECTED_IN_A_ROW rejections in a row; the caller reads the manifest to decide."""
        gen, guard, maker = self.gen, self.guard, self.maker
        queue = collections.deque((slot, 0) for slot in slots)
        rejected_in_a_row = 0
        while queue and rejected_in_a_row < MAX_REJECTED_IN_A_ROW:
            batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
            images, masks = maker.render(batch)
            judged = guard.judge(images, maker.source_indices(batch))
            source_distances = judged.source_distances or [None] * len(batch)
            new_rows = []
            for index, ((slot, attempt), image, near, distance, score, copy) in enumerate(zip(
                    batch, images, judged.nearest_ids, judged.distances, judged.scores, judged.copies)):
                judgement = (near, distance, score, source_distances[index])
                copy_like = gen.guard and gen.method not in UNSAMPLED_METHODS and copy
                if copy_like and attempt + 1 < gen.max_attempts:
                    queue.appendleft((slot, attempt + 1))  # retried in the next batch, before new slots
                    self.rejected_attempts += 1
                    continue
                if copy_like:
                    self.rejected_attempts += 1
                    rejected_in_a_row += 1
                    new_rows.append(maker.row(slot, attempt, *judgement, kept=False,
                                              reason=f"memorization: {guard.description} in all {gen.max_attempts} "
                                                     "attempts"))
                    continue
                if masks is not None:  # the mask first: a kept image in the manifest always has its mask
                    save_mask(self.folder / mask_file(slot), masks[index])
                save_png(self.folder / image_file(slot), image, maker.grayscale, maker.variant, slot)
                new_rows.append(maker.row(slot, attempt, *judgement, kept=True, reason=""))
                self.made += 1
                rejected_in_a_row = 0
            self.manifest.add(new_rows)
            rate = self.made / (time.perf_counter() - self.started)
            self.progress.update(self.task, advance=len(kept_rows(new_rows)), rate=f"{rate:.2f}")


def _clear_pool(folder: Path) -> None:
    for pattern in ("s*.png", f"{MASKS}/s*.png", "manifest*.csv", "summary.json"):
        for path in folder.glob(pattern):
            path.unlink()


def _normal_images(train: list[SplitRow], method: str) -> list[SplitRow]:
    """The normal training images a defect method pastes onto: the one class of the split's negatives."""
    if method not in DEFECT_METHODS:
        return []
    normals = [row for row in train if not row.rare]
    classes = sorted({row.cls for row in normals})
    if len(classes) != 1:
        found = ", ".join(classes[:5]) + (" ..." if len(classes) > 5 else "") if classes else "none"
        raise RareaugError(f"--method {method} pastes defects onto images of the normal class, but this run's "
                           f"negatives are {len(classes)} classes ({found}); use data with one normal class (the mt "
                           "and mvtec layouts with --negatives normal, or a folder with one other class)")
    return normals


def _rejected(rows: list[dict]) -> int:
    return sum(1 for row in rows if not is_kept(row))


def _fit_stage(run: RunDir, method: str, lora: str = "none") -> dict | None:
    """The fit config the LoRAs came from. Baselines sampled from the base model borrow the run's first fit,
    if any, so that every method of a run is sampled on the same base model at the same resolution."""
    if method == "img2img" and lora != "none":
        method = lora  # img2img on the class LoRA: sampled like that LoRA's own method
    if method not in LORA_METHODS:
        fitted = [run.stage_config("fit", m) for m in LORA_METHODS if run.stage_config("fit", m).exists()]
        borrows = method in ("classprompt", "img2img")
        return yaml.safe_load(fitted[0].read_text()) if fitted and borrows else None
    path = run.stage_config("fit", method)
    if not path.exists():
        raise RareaugError(f"no {method} LoRAs in {run.path}: "
                           f"run `rareaug fit --run {run.path} --method {method}` first")
    return yaml.safe_load(path.read_text())


def _with_fit_settings(config: Config, fit_stage: dict | None) -> Config:
    """LoRA methods sample at the resolution and on the base model they were fitted with."""
    if fit_stage is None:
        return config
    gen = config.generate
    base = fit_stage["fit"]["base_model"]
    without_lora = gen.method == "classprompt" or (gen.method == "img2img" and gen.lora == "none")
    if without_lora and gen.base_model:
        return config  # an explicit model for a baseline without LoRA
    if gen.base_model and gen.base_model != base:
        lora_method = gen.lora if gen.method == "img2img" else gen.method
        raise RareaugError(f"--base-model {gen.base_model}: the {lora_method} LoRAs were fitted on {base}; "
                           "sample on the model they were trained on")
    recipe = dataclasses.replace(config.recipe, resolution=fit_stage["recipe"]["resolution"])
    # The whole fit the LoRAs came from, so a refit under another config makes this pool's record differ.
    fit = FitConfig(**fit_stage["fit"])
    return dataclasses.replace(config, recipe=recipe, fit=fit, generate=dataclasses.replace(gen, base_model=base))


def _with_resolved_base(config: Config, run: RunDir) -> Config:
    """Bare `adapted` recorded (and named in the variant) as the adapted model it means."""
    gen = config.generate
    spec = gen.base_model or config.fit.base_model
    if gen.method in UNSAMPLED_METHODS or not is_adapted(spec):
        return config
    return dataclasses.replace(config, generate=dataclasses.replace(
        gen, base_model=resolve_adapted(run.adapted_root, spec)))


def _default_batch_size(device: torch.device, resolution: int) -> int:
    if device.type != "cuda":
        return 4
    return max(1, int(48 * (512 / resolution) ** 2))


class _ImageMaker:
    """Turns (slot, attempt) pairs into images for one variant, and describes them for the manifest."""

    def __init__(self, config: Config, run: RunDir, sources: list[SplitRow], normals: list[SplitRow], variant: str,
                 device):
        gen, recipe = config.generate, config.recipe
        self.config, self.variant, self.device = config, variant, device
        self.resolution = recipe.resolution
        self.cls = sources[0].cls
        self.prompt = recipe.prompt.replace("{class}", self.cls)
        self.sources = sources
        self.source_ids = [row.id for row in sources]
        self.source_index = {row_id: index for index, row_id in enumerate(self.source_ids)}
        self.reals = torch.stack([self._load(row) for row in sources])
        # Defects carry the normal images' pixels too (a sample of them: each check decodes an image).
        self.grayscale = all(_is_gray(row) for row in sources + normals[:16])
        self.seed = config.seed
        self.base_name, self.base_hash, self.base_revision, self.is_tiny = "none", "", "", False
        self.slot_of: dict[str, int] = {}
        # img2img: the real image each slot starts from, round-robin over this fold's rare train images.
        self.source_plan = plans.SingleAdapter(self.source_ids, config.seed)
        self.normal_by_id = {row.id: row for row in normals}
        self.normal_plan = plans.SingleAdapter([row.id for row in normals], config.seed, shuffle=True) if normals \
            else None
        self.sampler = None
        if gen.method == "classic":
            self.plan = plans.SingleAdapter(self.source_ids, config.seed, shuffle=True)
            return
        if gen.method in DEFECT_METHODS:
            self.plan = plans.NoAdapter()
            return
        from ..models import load_base_model

        amp = sampling_dtype(device)
        base_spec = gen.base_model or config.fit.base_model
        base = load_base_model(base_spec, device=device, dtype=amp, run=run.path, fold=gen.fold)
        self.base_name, self.base_revision, self.is_tiny = model_label(base_spec), base.revision or "", base.is_tiny
        self.base_hash = base.weights_hash  # before LoRA layers are installed
        self.text_bank = None
        self.targets = tuple(config.fit.targets.split(","))  # the layers the LoRAs were fitted on
        lora_method = gen.method if gen.method != "img2img" else ("classprompt" if gen.lora == "none" else gen.lora)
        bank = self._bank(base, run, lora_method)
        self.sampler = BankSampler(base, bank, self.prompt, gen.guidance, gen.steps, gen.scheduler, device,
                                   recipe.resolution, text_bank=self.text_bank)

    def _load(self, row: SplitRow) -> torch.Tensor:
        recipe = self.config.recipe
        return model_input(row.abs_path, recipe.resolution, recipe.crop, recipe.fallback_crop, row.abs_mask,
                           self.config.data.frame) / 2 + 0.5

    def _bank(self, base, run: RunDir, method: str):
        folder = run.loras(method)
        gen = self.config.generate
        if method == "classprompt":
            self.plan = plans.NoAdapter()
            return None
        # Class-level LoRAs are fitted once per fold when the split has folds (see fit.plan_jobs).
        stem = self.cls if gen.fold is None else f"{self.cls}-f{gen.fold}"
        if method == "chimera":
            bank, heads = bank_from_chimera_file(base.unet, folder / f"{safe_name(stem)}.safetensors", self.targets)
            allowed = [head for head in heads if head in self.source_ids]
            self.slot_of = {head: slot for slot, head in enumerate(heads)}
            self.plan = plans.ChimeraMix(allowed, self.seed, gen.k, gen.dirichlet_alpha)
            return bank
        done = finished_units(folder, self.config.fit.steps)
        ids = self.source_ids if method == "loft" else [stem]
        if method == "loft" and is_adapted(self.config.fit.base_model) and gen.fold is not None:
            ids = [f"{unit}-f{gen.fold}" for unit in ids]  # fitted per fold on each fold's adapted base
        missing = [unit for unit in ids if unit not in done]
        if missing:
            raise RareaugError(f"{len(missing)} of {len(ids)} {method} LoRA(s) missing in {folder} "
                               f"(e.g. {missing[0]}); run `rareaug fit --run {run.path} --method {method}` first")
        self.slot_of = {unit: slot for slot, unit in enumerate(ids)}
        self.plan = (plans.LoftPairs(ids, self.seed, gen.lam, gen.beta_alpha) if method == "loft"
                     else plans.SingleAdapter(ids, self.seed))
        paths = [folder / f"{safe_name(unit)}.safetensors" for unit in ids]
        if method == "datadream":
            self.text_bank = bank_from_lora_files(base.text_encoder, paths, prefix=TEXT_PREFIX)
        return bank_from_lora_files(base.unet, paths, self.targets)

    def source_indices(self, batch: list[tuple[int, int]]) -> list[int] | None:
        """img2img: per image, the index of the real image it starts from (the guard leaves it out)."""
        if self.config.generate.method != "img2img":
            return None
        return [self.source_index[self.source_plan(slot).loras[0]] for slot, _ in batch]

    def render(self, batch: list[tuple[int, int]]) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Images (n, 3, H, W) in [0, 1] for (slot, attempt) pairs, each alone would come out the same; and the
        defect methods' masks (H, W), else None."""
        gen = self.config.generate
        if gen.method == "classic":
            return torch.stack([classic_copy(self.reals[self.source_index[self.plan(slot).loras[0]]],
                                             self.config.recipe.augment,
                                             plans.image_seed(self.seed, slot, attempt) % 2**32)
                                for slot, attempt in batch]), None
        if gen.method in DEFECT_METHODS:
            made = [self._defect(slot, attempt) for slot, attempt in batch]
            return torch.stack([image for image, _ in made]), [mask for _, mask in made]
        requests = []
        for slot, attempt in batch:
            mix = self.plan(slot)
            if gen.method == "chimera":
                a_slots, b_slots = [0] * len(mix.loras), [self.slot_of[head] for head in mix.loras]
            else:
                a_slots = b_slots = [self.slot_of[unit] for unit in mix.loras]
            requests.append(SampleRequest(a_slots, b_slots, list(mix.weights),
                                          plans.image_seed(self.seed, slot, attempt)))
        if gen.method == "img2img":
            return self.sampler.sample(requests, self.reals[self.source_indices(batch)], gen.strength), None
        return self.sampler.sample(requests), None

    def _defect_parts(self, slot: int, attempt: int) -> tuple[SplitRow, SplitRow, object]:
        """The slot's normal image (epochs of a seeded order), its donor rare image and its random stream."""
        rng = plans.stream(self.seed, self.config.generate.method, slot, attempt)
        normal = self.normal_by_id[self.normal_plan(slot).loras[0]]
        return normal, self.sources[int(rng.integers(len(self.sources)))], rng

    def _defect(self, slot: int, attempt: int) -> tuple[torch.Tensor, torch.Tensor]:
        normal, donor, rng = self._defect_parts(slot, attempt)
        recipe, frame = self.config.recipe, self.config.data.frame
        base = self._load(normal)
        donor_image, donor_mask = model_input_with_mask(donor.abs_path, recipe.resolution, recipe.crop,
                                                        recipe.fallback_crop, donor.abs_mask, frame)
        if self.config.generate.method == "cutpaste":
            return defects.cutpaste(base, donor_image / 2 + 0.5, donor_mask, rng)
        return defects.perlin(base, donor_image / 2 + 0.5, rng)

    def row(self, slot: int, attempt: int, nearest: str, distance: float, score: float,
            source_distance: float | None, kept: bool, reason: str) -> dict:
        gen = self.config.generate
        mix = self.plan(slot)
        sampling = gen.method not in UNSAMPLED_METHODS
        source = donor = mask = ""
        if gen.method == "img2img":
            source = self.source_plan(slot).loras[0]
        elif gen.method in DEFECT_METHODS:
            normal, donor_row, _ = self._defect_parts(slot, attempt)
            source, donor, mask = normal.id, donor_row.id, mask_file(slot) if kept else ""
        return {
            "file": image_file(slot) if kept else "", "pool_index": slot, "class": self.cls, "method": gen.method,
            "loras": ";".join(mix.loras), "weights": ";".join(f"{w:.6g}" for w in mix.weights),
            # A defect's draws come from the stream (seed, method, slot, attempt), not from one integer seed.
            "seed": "" if gen.method in DEFECT_METHODS else plans.image_seed(self.seed, slot, attempt),
            "attempt": attempt,
            "guidance": gen.guidance if sampling else "", "steps": gen.steps if sampling else "",
            "scheduler": gen.scheduler if sampling else "", "prompt": self.prompt if sampling else "",
            "base_model": self.base_name, "base_model_hash": self.base_hash, "rareaug_version": __version__,
            "nearest_real_id": nearest, "nearest_real_distance": f"{distance:.6g}",
            "guard_score": f"{score:.6g}", "kept": int(kept),
            "reject_reason": reason, "source_id": source, "donor_id": donor,
            "strength": gen.strength if gen.method == "img2img" else "",
            "source_distance": f"{source_distance:.6g}" if source_distance is not None else "", "mask": mask,
        }


def _is_gray(row: SplitRow) -> bool:
    return decode(row.abs_path).pixels.shape[0] == 1




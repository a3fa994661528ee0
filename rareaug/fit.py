"""`rareaug fit`: train the LoRAs of one method on the rare class's training images, all in one bank."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import platform
import io
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from . import __version__, distributed
from .config import Config, FitConfig, resolved_fit
from .errors import RareaugError
from .images import model_input
from .io import atomic_write_text
from .lora.bank import LoRABank
from .lora.files import TEXT_PREFIX, TEXT_TARGETS, read_safetensors, save_safetensors, to_diffusers_state
from .lora.train import CHECKPOINT_SUFFIX, Job, JobRunner, TrainData, amp_settings, checkpoint_path
from .run_dir import RunDir, frozen_split, timed_stage
from .split import SplitRow

# lora: the file (stem) the row's weights live in — the image id for LoFT, the class (and fold) otherwise.
INDEX_COLUMNS = ("image_id", "lora", "class", "method", "steps_done", "final_loss", "base_model")
LOSS_COLUMNS = ("lora", "image_id", "step", "loss")
FINAL_LOSS_WINDOW = 10  # final_loss = mean of the last steps' losses: one step's timestep is too noisy


@dataclasses.dataclass
class FitResult:
    method: str
    out_dir: Path
    trained: list[str]
    skipped: list[str]
    adapter_steps_per_s: float | None


def model_label(spec: str) -> str:
    """How a base model is named in files others may see: hub ids and `tiny` as given, a local path by its
    last component only (paths stay on this machine; the weights hash identifies the model)."""
    path = Path(spec).expanduser()
    return path.name if path.exists() else spec


def resolve_device(name: str) -> torch.device:
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


def same_model_as_other_fits(config: Config, given: set[str]) -> Config:
    """Methods side by side in one run are compared on one base model and resolution: a method fitted
    without --base-model / --resolution takes those of the run's earlier fits."""
    import yaml

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


def training_rows(rows: list[SplitRow], folds: int) -> list[SplitRow]:
    """The rare `train` images; with folds, every non-test rare image (each fold fuses only its own)."""
    if folds > 1:
        return [row for row in rows if row.rare and row.split != "test"]
    return [row for row in rows if row.rare and row.split == "train"]


@timed_stage(lambda config: f"fit {config.fit.method}", worked=lambda result: bool(result.trained))
def fit(config: Config, given: set[str] = frozenset(), force: bool = False, console: Console | None = None) -> FitResult:
    """Under `accelerate launch` / `torchrun`, each process trains its share of the LoRAs (see distributed.py)."""
    from .models import check_base_model_spec, load_base_model

    console = console or Console(stderr=True)
    # 1. Check inputs before any model is loaded.
    config = same_model_as_other_fits(config, given)
    fit_config = resolved_fit(config)
    check_base_model_spec(fit_config.base_model)
    distributed.setup(config.device)
    device = resolve_device(distributed.local_device(config.device))

    # 2. The frozen split and the images to train on.
    with distributed.main_first():
        rows, config, _ = frozen_split(config, given)
    train = training_rows(rows, config.split.folds)
    if len(train) < 2:
        raise RareaugError(f"{RunDir(config.run_dir()).split_csv}: only {len(train)} rare training image(s); "
                           "LoFT fuses pairs, so at least 2 are needed (add images or lower --val-fraction)")
    config = dataclasses.replace(config, fit=fit_config)

    # 3. The stage config, written before work starts; a different config for this method is refused.
    run = RunDir(config.run_dir())
    method = fit_config.method
    out_dir = run.path / "loras" / method
    with distributed.main_first():
        start_over = run.check_stage_config("fit", method, config, force=force)
        out_dir.mkdir(parents=True, exist_ok=True)
    jobs_all = plan_jobs(method, train, config.split.folds)
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
    base = load_base_model(fit_config.base_model, device=device, dtype=amp_dtype or torch.float32)
    distributed.barrier()  # every process has read what was there before rank 0 clears it
    if distributed.is_main():
        if start_over:
            clear_outputs(out_dir)  # --force with a new config: LoRAs of the old one must not mix in
        run.write_stage_config("fit", method, config)
    with distributed.main_first():
        data = encode_training_set(base, train, config, run, device)

    # 5. Train this process's jobs in one bank, LoFT's adapters batch_size at a time.
    checkpoints = out_dir / "checkpoints"
    batch_file = checkpoints / ("batch_size" if distributed.world_size() == 1 else f"batch_size.{distributed.rank()}")
    batch_size = (fit_config.batch_size or resumed_batch_size(batch_file)
                  or default_batch_size(device, method, len(train)))
    checkpoints.mkdir(exist_ok=True)
    atomic_write_text(batch_file, f"{batch_size}\n")
    jobs = regroup_loft(jobs, batch_size) if method == "loft" else jobs
    trained, rate = _train_jobs(jobs, base, data, train, config, device, batch_size, out_dir, console) if jobs else ([], 0.0)

    # 6. Rank 0 folds every process's index and loss shards into index.csv and losses.csv.
    distributed.barrier()
    if distributed.is_main():
        merge_shards(out_dir)
        clear_checkpoints(out_dir)  # every job is done: what is left belongs to chunkings no longer used
    distributed.barrier()
    trained_all = [unit for part in distributed.gather(trained) for unit in part]
    rates = distributed.gather(rate)  # adapter-steps/s of each process; together they are the run's
    if distributed.is_main():
        console.print(f"fit {method}: trained {len(trained_all)} LoRA(s), skipped {len(skipped)} already done -> {out_dir}"
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
                       checkpoint_dir=out_dir / "checkpoints", on_step=tracker.advance,
                       text_encoder=base.text_encoder, text_bank=text_bank)
    trained = []
    with tracker:
        for job in jobs:
            losses = runner.run(job)
            save_job(job, bank, losses, train, fit_config, base, out_dir, text_bank)
            checkpoint_path(out_dir / "checkpoints", job.key).unlink(missing_ok=True)
            trained += job.units
    return trained, tracker.rate()


def clear_outputs(out_dir: Path) -> None:
    """Remove a method's LoRAs, index, losses and checkpoints (rareaug's own outputs, never user data)."""
    for pattern in ("*.safetensors", "index.csv", "losses.csv", "index.part-*.csv", "losses.part-*.csv", "checkpoints/*"):
        for path in out_dir.glob(pattern):
            path.unlink()


def resumed_batch_size(recorded: Path) -> int | None:
    """An interrupted fit without --batch-size resumes with the chunking its checkpoints were made with
    (the default depends on free GPU memory, which can differ between runs)."""
    if recorded.exists() and list(recorded.parent.glob(f"*{CHECKPOINT_SUFFIX}")):
        return int(recorded.read_text())
    return None


def clear_checkpoints(out_dir: Path) -> None:
    for path in (out_dir / "checkpoints").glob("*"):
        path.unlink()


def plan_jobs(method: str, train: list[SplitRow], folds: int = 1) -> list[Job]:
    """LoFT: one job per image (grouped into chunks later); folds only restrict which pairs are fused.
    The class methods: one job for the class — with folds, one per fold on the images outside it, since a
    class-level LoRA trained on fold k's images would leak them into fold k's synthetic data."""
    if method == "loft":
        return [Job("loft", f"loft-{row.id}", [row.id], [i]) for i, row in enumerate(train)]
    cls = train[0].cls
    if folds == 1:
        return [Job(method, f"{method}-{safe_name(cls)}", [cls], list(range(len(train))))]
    return [Job(method, f"{method}-{safe_name(cls)}-f{k}", [f"{cls}-f{k}"],
                [i for i, row in enumerate(train) if row.fold != k]) for k in range(folds)]


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


def finished_units(out_dir: Path, steps: int) -> set[str]:
    """Units (image ids for LoFT, the class otherwise) whose file exists and whose index row says all
    steps were done: the index is written after the file, so a file alone is not proof. Index shards of
    processes that were stopped before rank 0 merged them count too."""
    return {row["lora"] for row in _index_rows(out_dir)
            if int(row["steps_done"]) >= steps and (out_dir / f"{safe_name(row['lora'])}.safetensors").exists()}


def _index_rows(out_dir: Path) -> list[dict]:
    """index.csv and every process's shard of it (shards are newer than the index)."""
    paths = [out_dir / "index.csv", *sorted(out_dir.glob("index.part-*.csv"))]
    return [row for rows in _rows_by_lora(paths).values() for row in rows]


def _rows_by_lora(paths: list[Path]) -> dict[str, list[dict]]:
    """Each LoRA's rows from the last of `paths` that has it: as in `_append_index`, a job run again
    replaces all of its LoRA's rows."""
    found: dict[str, list[dict]] = {}
    for path in paths:
        if path.exists():
            newer: dict[str, list[dict]] = {}
            with open(path, newline="") as handle:
                for row in csv.DictReader(handle):
                    newer.setdefault(row["lora"], []).append(row)
            found.update(newer)
    return found


def merge_shards(out_dir: Path) -> None:
    """Fold the processes' index and loss shards into index.csv and losses.csv (rank 0, after the others finished)."""
    index_parts, loss_parts = sorted(out_dir.glob("index.part-*.csv")), sorted(out_dir.glob("losses.part-*.csv"))
    if not index_parts and not loss_parts:
        return
    rows = sorted(_index_rows(out_dir), key=lambda row: (row["lora"], row["image_id"]))
    _write_index(out_dir / "index.csv", [[row[column] for column in INDEX_COLUMNS] for row in rows])
    losses = _rows_by_lora([out_dir / "losses.csv", *loss_parts])
    atomic_write_text(out_dir / "losses.csv", "\n".join([",".join(LOSS_COLUMNS)] + [
        ",".join(row[column] for column in LOSS_COLUMNS) for lora in sorted(losses) for row in losses[lora]]) + "\n")
    for path in index_parts + loss_parts:
        path.unlink()


def encode_training_set(base, train: list[SplitRow], config: Config, run: RunDir, device: torch.device) -> TrainData:
    """VAE posteriors and prompt embeddings, computed once and cached; then the VAE and text encoder
    leave the GPU, since training needs neither."""
    recipe = config.recipe
    key = hashlib.sha256(f"{config.fit.base_model}|{recipe.resolution}|{recipe.crop}|{recipe.fallback_crop}|"
                         f"{recipe.prompt}".encode()).hexdigest()[:12]
    cache = run.path / "cache" / f"train-{key}.safetensors"
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
            posteriors.append(base.vae.encode(pixels[None].to(device, base.vae.dtype)).latent_dist.parameters.float().cpu())
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


def _tokens(base, prompt: str) -> torch.Tensor:
    return base.tokenizer(prompt, padding="max_length", max_length=base.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids


def save_job(job: Job, bank: LoRABank, losses: dict[str, list[float]], train: list[SplitRow], fit_config: FitConfig,
             base, out_dir: Path, text_bank: LoRABank | None = None) -> None:
    """Write the job's LoRA files, then its index and loss rows (files first: the index marks done)."""
    scale = fit_config.alpha / fit_config.rank
    cls_of = {row.id: row.cls for row in train}
    common = {"rareaug_version": __version__, "method": job.method, "rank": fit_config.rank,
              "alpha": fit_config.alpha, "steps": fit_config.steps, "base_model": model_label(fit_config.base_model),
              "tiny_test_model": base.is_tiny, "format": "diffusers peft keys; alpha/rank folded into lora_B"}
    index_rows = []
    if job.method == "loft":
        for slot, unit in enumerate(job.units):
            state = to_diffusers_state(bank.get_slot(slot), scale)
            save_safetensors(out_dir / f"{safe_name(unit)}.safetensors", state,
                             {**common, "image_id": unit, "class": cls_of[unit]})
            index_rows.append((unit, unit, cls_of[unit], _final(losses[unit])))
    elif job.method == "datadream":
        stem, cls = job.units[0], train[job.images[0]].cls
        state = to_diffusers_state(bank.get_slot(0), scale)
        if text_bank is not None:
            state.update(to_diffusers_state(text_bank.get_slot(0), scale, prefix=TEXT_PREFIX))
        save_safetensors(out_dir / f"{safe_name(stem)}.safetensors", state,
                         {**common, "class": cls, "images": [train[i].id for i in job.images],
                          "text_encoder_lora": text_bank is not None})
        index_rows.append((stem, stem, cls, _final([v for values in losses.values() for v in values])))
    else:  # chimera: the shared A and every B head in one file
        stem, cls = job.units[0], train[job.images[0]].cls
        heads = [train[i].id for i in job.images]
        tensors = {}
        for name, layer in bank.layers.items():
            tensors[f"{name}.A"] = layer.lora_A[0].detach().cpu()
            # (heads, out, r), scale folded; the bank may hold more slots than this fold's heads
            tensors[f"{name}.B"] = layer.lora_B[:len(heads)].detach().cpu() * scale
        save_safetensors(out_dir / f"{safe_name(stem)}.safetensors", tensors, {**common, "class": cls, "heads": heads})
        index_rows += [(head, stem, cls, _final(losses.get(head, []))) for head in heads]
    part = "" if distributed.world_size() == 1 else f".part-{distributed.rank()}"
    _append_index(out_dir / f"index{part}.csv", index_rows, job.method, fit_config.steps,
                  model_label(fit_config.base_model))
    _append_losses(out_dir / f"losses{part}.csv", job.units[0] if job.method != "loft" else None, losses)


def _final(values: list[float]) -> float:
    tail = values[-FINAL_LOSS_WINDOW:]
    return sum(tail) / len(tail) if tail else float("nan")


def _append_index(path: Path, rows, method: str, steps: int, base_model: str) -> None:
    existing = []
    if path.exists():
        with open(path, newline="") as handle:
            existing = [row for row in csv.DictReader(handle)]
    new_loras = {row[1] for row in rows}
    _write_index(path, [[row[column] for column in INDEX_COLUMNS] for row in existing if row["lora"] not in new_loras]
                 + [[image_id, lora, cls, method, steps, f"{loss:.6g}", base_model] for image_id, lora, cls, loss in rows])


def _write_index(path: Path, rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _append_losses(path: Path, lora: str | None, losses: dict[str, list[float]]) -> None:
    """One row per (LoRA, image, step); a job rerun replaces its LoRA's rows. For LoFT the LoRA is the image."""
    def owner(image_id: str) -> str:
        return lora or image_id

    owners = {owner(image_id) for image_id in losses}
    kept = path.read_text().splitlines()[1:] if path.exists() else []
    kept = [line for line in kept if line.split(",", 1)[0] not in owners]
    lines = [",".join(LOSS_COLUMNS), *kept]
    for image_id, values in losses.items():
        lines += [f"{owner(image_id)},{image_id},{step},{value:.6g}" for step, value in enumerate(values, start=1)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def export_mix(chimera_file: Path, weights: dict[str, float], out_path: Path) -> Path:
    """A ChimeraLoRA head mix (shared A, B = sum_i w_i B_i) as a plain diffusers LoRA file."""
    tensors, metadata = read_safetensors(chimera_file)
    import json

    heads = json.loads(metadata["heads"])
    unknown = sorted(set(weights) - set(heads))
    if unknown:
        raise RareaugError(f"{chimera_file}: no head {unknown[0]!r}; heads are {', '.join(heads)}")
    mix = torch.tensor([weights.get(head, 0.0) for head in heads])
    factors = {}
    for key, value in tensors.items():
        layer, _, part = key.rpartition(".")
        factors[key] = value if part == "A" else torch.einsum("h,hor->or", mix, value)
    save_safetensors(out_path, to_diffusers_state(factors, 1.0), {**metadata, "mix": weights})
    return out_path


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

"""A method's LoRA set in the run directory (`loras/<method>/`): the files, `index.csv` (which LoRA holds which
image, steps done, final loss), `losses.csv`, the per-process shards of both, resume checkpoints and
ChimeraLoRA head mixes. Fit writes it; generate and export-mix read it; neither imports the other.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__, distributed
from ..config import FitConfig
from ..errors import RareaugError
from ..io import read_csv, write_csv
from ..split import SplitRow
from .bank import LoRABank
from .files import TEXT_PREFIX, read_safetensors, save_safetensors, to_diffusers_state
from .train import CHECKPOINT_SUFFIX, Job

# lora: the file (stem) the row's weights live in — the image id for LoFT, the class (and fold) otherwise.
INDEX_COLUMNS = ("image_id", "lora", "class", "method", "steps_done", "final_loss", "base_model")
LOSS_COLUMNS = ("lora", "image_id", "step", "loss")
FIX = "rerun `rareaug fit` with --force to train this method's LoRAs again"
FINAL_LOSS_WINDOW = 10  # final_loss = mean of the last steps' losses: one step's timestep is too noisy


def model_label(spec: str) -> str:
    """How a base model is named in files others may see: hub ids and `tiny` as given, a local path by its
    last component only (paths stay on this machine; the weights hash identifies the model)."""
    path = Path(spec).expanduser()
    return path.name if path.exists() else spec


def clear_outputs(out_dir: Path) -> None:
    """Remove a method's LoRAs, index, losses and checkpoints (rareaug's own outputs, never user data)."""
    for pattern in ("*.safetensors", "index.csv", "losses.csv", "index.part-*.csv", "losses.part-*.csv",
                    "checkpoints/*"):
        for path in out_dir.glob(pattern):
            path.unlink()


def resumed_batch_size(recorded: Path) -> int | None:
    """An interrupted fit without --batch-size resumes with the chunking its checkpoints were made with
    (the default depends on free GPU memory, which can differ between runs)."""
    if recorded.exists() and list(recorded.parent.glob(f"*{CHECKPOINT_SUFFIX}")):
        return int(recorded.read_text())
    return None


def checkpoint_folder(out_dir: Path) -> Path:
    """Resume checkpoints of unfinished jobs (and the batch size they were chunked with)."""
    return out_dir / "checkpoints"


def clear_checkpoints(out_dir: Path) -> None:
    for path in checkpoint_folder(out_dir).glob("*"):
        path.unlink()


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
        newer: dict[str, list[dict]] = {}
        for row in read_csv(path, fix=FIX):
            newer.setdefault(row["lora"], []).append(row)
        found.update(newer)
    return found


def merge_shards(out_dir: Path) -> None:
    """Fold the processes' index and loss shards into index.csv and losses.csv (rank 0, after the others finished)."""
    index_parts, loss_parts = sorted(out_dir.glob("index.part-*.csv")), sorted(out_dir.glob("losses.part-*.csv"))
    if not index_parts and not loss_parts:
        return
    write_csv(out_dir / "index.csv", INDEX_COLUMNS, sorted(_index_rows(out_dir), key=lambda row: (row["lora"],
                                                                                              row["image_id"])))
    losses = _rows_by_lora([out_dir / "losses.csv", *loss_parts])
    write_csv(out_dir / "losses.csv", LOSS_COLUMNS, (row for lora in sorted(losses) for row in losses[lora]))
    for path in index_parts + loss_parts:
        path.unlink()


def save_job(job: Job, bank: LoRABank, losses: dict[str, list[float]], train: list[SplitRow], fit_config: FitConfig,
             base, out_dir: Path, text_bank: LoRABank | None = None) -> None:
    """Write the job's LoRA files, then its index and loss rows (files first: the index marks done)."""
    scale = fit_config.alpha / fit_config.rank
    common = {"rareaug_version": __version__, "method": job.method, "rank": fit_config.rank,
              "alpha": fit_config.alpha, "steps": fit_config.steps, "base_model": model_label(fit_config.base_model),
              "base_model_revision": base.revision or "", "tiny_test_model": base.is_tiny,
              "format": "diffusers peft keys; alpha/rank folded into lora_B"}
    index_rows = []
    if job.method == "loft":
        for slot, unit in enumerate(job.units):  # a unit is the image id, or `<id>-f<k>` when fitted per fold
            row = train[job.images[slot]]
            state = to_diffusers_state(bank.get_slot(slot), scale)
            save_safetensors(out_dir / f"{safe_name(unit)}.safetensors", state,
                             {**common, "image_id": row.id, "class": row.cls})
            index_rows.append((row.id, unit, row.cls, _final(losses[unit])))
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
    """A job run again replaces all of its LoRA's rows."""
    new_loras = {row[1] for row in rows}
    kept = [row for row in read_csv(path, fix=FIX) if row["lora"] not in new_loras]
    write_csv(path, INDEX_COLUMNS, kept + [[image_id, lora, cls, method, steps, f"{loss:.6g}", base_model]
                                           for image_id, lora, cls, loss in rows])


def _append_losses(path: Path, lora: str | None, losses: dict[str, list[float]]) -> None:
    """One row per (LoRA, image, step); a job rerun replaces its LoRA's rows. For LoFT the LoRA is the image."""
    def owner(image_id: str) -> str:
        return lora or image_id

    owners = {owner(image_id) for image_id in losses}
    kept = [row for row in read_csv(path, fix=FIX) if row["lora"] not in owners]
    write_csv(path, LOSS_COLUMNS, kept + [[owner(image_id), image_id, step, f"{value:.6g}"]
                                          for image_id, values in losses.items()
                                          for step, value in enumerate(values, start=1)])


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def export_mix(chimera_file: Path, weights: dict[str, float], out_path: Path) -> Path:
    """A ChimeraLoRA head mix (shared A, B = sum_i w_i B_i) as a plain diffusers LoRA file."""
    tensors, metadata = read_safetensors(chimera_file)
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

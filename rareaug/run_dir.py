"""The run directory: how stages talk (DESIGN.md). This module owns its file names and the frozen split."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import yaml

from data_adapters import Dataset, load_dataset
from data_adapters.layouts.common import RAREAUG_MARKER

from .config import Config, SplitConfig, hash_path, stage_record
from .device import requested_device_label
from .errors import RareaugError, one_line
from .io import atomic_write_json, atomic_write_text, atomic_write_yaml
from .near_duplicates import WHOLESALE_SHARE, duplicated_test_share
from .run_lock import lock_run
from .split import (
    SplitRow,
    fold_view,
    make_split,
    read_split,
    seen_rows,
    write_split,
)

MIN_RARE = 5
FEW_RARE = 20
# What the frozen split depends on. `seed` is absent on purpose: a later --seed never moves an image.
SPLIT_KEYS = ("data.data", "data.layout", "data.rare", "data.negatives", "data.max_rare", "data.max_per_class",
              "data.test_data", "data.frame", "split.test_fraction", "split.val_fraction", "split.folds")


def timed_stage(name_of, worked=lambda result: True):
    """Decorate a stage function taking the config first: its wall time, when it succeeds and `worked(result)`
    (it did something, rather than find its outputs there already), goes to timings.json."""
    def decorate(stage):
        @functools.wraps(stage)
        def timed(config: Config, *args, **kwargs):
            lock_run(config.run_dir())  # a new run is locked where frozen_split creates it
            start = time.monotonic()
            result = stage(config, *args, **kwargs)
            from . import distributed

            if worked(result) and distributed.is_main():  # one record for all processes of a run
                RunDir(config.run_dir()).add_time(name_of(config), time.monotonic() - start,
                                                  requested_device_label(config.device))
            return result
        return timed
    return decorate


class RunDir:
    """The run directory's tree, named once: every stage finds its inputs and outputs here (docs/DESIGN.md
    lists who writes and who reads each file)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # --- split and records (inspect / fit) ---------------------------------------------------------------
    @property
    def split_csv(self) -> Path:
        return self.path / "split.csv"

    @property
    def data_json(self) -> Path:
        return self.path / "data.json"

    @property
    def timings_json(self) -> Path:
        return self.path / "timings.json"

    @property
    def stages(self) -> Path:
        """stages/<stage>[-<variant>].yaml: the resolved config each stage ran with."""
        return self.path / "stages"

    def train_cache(self, key: str) -> Path:
        """Encoded training images and prompt embeddings, keyed by what they depend on."""
        return self.path / "cache" / f"train-{key}.safetensors"

    # --- fit: loras/<method>/ ----------------------------------------------------------------------------
    def loras(self, method: str) -> Path:
        """A method's LoRA set; `lora.store` owns the files inside it."""
        return self.path / "loras" / method

    # --- adapt: adapted/<variant>/ ------------------------------------------------------------------------
    @property
    def adapted_root(self) -> Path:
        return self.path / "adapted"

    def adapted(self, variant: str) -> Path:
        """An adapted base model; `models.adapted` owns the files inside it."""
        return self.adapted_root / variant

    # --- generate: synthetic/<variant>/ ------------------------------------------------------------------
    @property
    def synthetic(self) -> Path:
        return self.path / "synthetic"

    def pool(self, variant: str) -> Path:
        """A pool's images, manifest.csv (and its shards) and summary.json."""
        return self.synthetic / variant

    # --- sweep-ratio: sweep/ -----------------------------------------------------------------------------
    @property
    def sweep(self) -> Path:
        return self.path / "sweep"

    @property
    def sweep_cells(self) -> Path:
        return self.sweep / "cells"

    def sweep_cell(self, cell: str) -> Path:
        """A finished cell's result and the config hash it was made under (resume marker)."""
        return self.sweep_cells / f"{cell}.json"

    @property
    def sweep_predictions_folder(self) -> Path:
        return self.sweep / "predictions"

    def sweep_predictions(self, cell: str) -> Path:
        """A cell's scores on its validation, test and pool-sample images."""
        return self.sweep_predictions_folder / f"{cell}.csv"

    @property
    def sweep_metrics(self) -> Path:
        return self.sweep / "metrics.csv"

    @property
    def sweep_summary_json(self) -> Path:
        return self.sweep / "summary.json"

    @property
    def sweep_summary_md(self) -> Path:
        return self.sweep / "summary.md"

    # --- report ------------------------------------------------------------------------------------------
    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    @property
    def salt(self) -> str:
        """This run's secret for hashing paths and names (RUN/.salt, made with the run). A run made before salts
        existed (a split but no .salt) keeps "" so that its stored hashes still match."""
        path = self.path / ".salt"
        if path.is_file():
            return path.read_text().strip()
        if self.split_csv.exists():
            return ""
        import secrets

        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, secrets.token_hex(16) + "\n")
        return path.read_text().strip()

    def add_time(self, stage: str, seconds: float, device: str = "") -> None:
        """Wall time per stage, summed over resumed runs, for the report. One process per run directory is
        assumed, as for every stage; an unreadable file starts afresh rather than failing a finished stage."""
        try:
            timings = json.loads(self.timings_json.read_text()) if self.timings_json.is_file() else {}
        except (OSError, ValueError):
            timings = {}
        entry = timings.setdefault(stage, {"seconds": 0.0, "runs": 0})
        entry["seconds"] = round(entry["seconds"] + seconds, 2)
        entry["runs"] += 1
        entry["device"] = device
        atomic_write_json(self.timings_json, timings)

    def stage_config(self, stage: str, variant: str | None = None) -> Path:
        name = f"{stage}-{variant}" if variant else stage
        return self.stages / f"{name}.yaml"

    def check_stage_config(self, stage: str, variant: str | None, config: Config, force: bool = False) -> bool:
        """Refuse a config that differs from the one this stage variant already ran with, unless `force`.
        Returns True when there is such an earlier, different config (which `force` replaces)."""
        path = self.stage_config(stage, variant)
        if not path.exists():
            return False
        previous = _read_yaml(path)
        record = _without_new_defaults(_stage_sections(stage, stage_record(config, self.salt)), previous)
        if _without_execution(previous) == _without_execution(record):
            return False
        if not force:
            raise RareaugError(f"{path}: this run's {stage} used a different config "
                               f"({_first_difference(previous, record)}); "
                               "use a new --run, the same options, or --force to start it over")
        return True

    def write_stage_config(self, stage: str, variant: str | None, config: Config) -> Path:
        """Record the resolved config once the stage is set to work (its model loaded), so a command that
        fails while setting up leaves nothing that would refuse the corrected command."""
        path = self.stage_config(stage, variant)
        atomic_write_yaml(path, _stage_sections(stage, stage_record(config, self.salt)))
        return path


# What each stage's results depend on (data and split are frozen in split.csv): its record holds these only,
# so that changing a later stage's options never refuses an earlier stage's rerun.
STAGE_SECTIONS = {"fit": ("seed", "recipe", "fit"), "generate": ("seed", "recipe", "fit", "generate"),
                  "sweep": ("seed", "recipe", "generate", "sweep"), "adapt": ("seed", "recipe", "adapt")}

# How a stage runs, not what it computes (the bank makes results independent of the batch size): a rerun
# may change these freely.
EXECUTION_KEYS = {"device": None, "fit": ("batch_size", "gradient_checkpointing", "checkpoint_every"),
                  "generate": ("batch_size",), "adapt": ("checkpoint_every",)}


def _stage_sections(stage: str, record: dict) -> dict:
    keep = STAGE_SECTIONS.get(stage)
    return record if keep is None else {key: value for key, value in record.items() if key in keep}


def _read_yaml(path: Path) -> dict:
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise RareaugError(f"{path}: unreadable ({one_line(error, 120)}); restore it or use a new --run") from None
    if not isinstance(content, dict):
        raise RareaugError(f"{path}: not a rareaug stage config; restore it or use a new --run")
    return content


# Options added after runs were made, and the values that mean what a run made before them did.
BEFORE_IT_EXISTED = {("fit", "semantic_boost"): (None, False), ("generate", "strength"): (0.5,),
                     ("generate", "lora"): ("none",)}


def _without_new_defaults(record: dict, previous: dict) -> dict:
    """The record less the options a later rareaug added, where they hold a value that does what the run did
    before they existed: upgrading rareaug never refuses a resumed run that still computes the same thing."""
    kept = {}
    for key, value in record.items():
        if isinstance(value, dict) and isinstance(previous.get(key), dict):
            value = {k: v for k, v in value.items()
                     if k in previous[key] or v not in BEFORE_IT_EXISTED.get((key, k), ())}
        kept[key] = value
    return kept


def _without_execution(record: dict) -> dict:
    kept = {}
    for key, value in record.items():
        drop = EXECUTION_KEYS.get(key, ())
        if drop is None:
            continue
        kept[key] = {k: v for k, v in value.items() if k not in drop} if isinstance(value, dict) and drop else value
    return kept


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: was {old!r}, now {new!r}"


def _flat(config: Config) -> dict[str, Any]:
    return {f"{section}.{key}": value for section in ("data", "split")
            for key, value in dataclasses.asdict(getattr(config, section)).items()}


def data_folder(path: str | Path) -> Path:
    """The folder a --data or --test-data value names (a CSV file's own folder), resolved."""
    path = Path(path).expanduser().resolve()
    return path.parent if path.is_file() else path


def refuse_inside_data(target: Path, flag: str, data_roots) -> None:
    """rareaug never writes into the user's data: an output folder inside a data folder (or the reverse) is
    refused, since a later `inspect` of that folder would take rareaug's files for real images."""
    target = Path(target).expanduser().resolve()
    for root in {data_folder(root) for root in data_roots if root}:
        if target == root or root in target.parents:
            raise RareaugError(f"{flag} {target} is inside the data folder {root}; rareaug never writes into your "
                               f"data: choose a {flag} outside it")
        if target in root.parents:
            raise RareaugError(f"the data folder {root} is inside {flag} {target}; keep data and rareaug's "
                               f"outputs apart: choose a {flag} outside the data")


def mark_rareaug_folder(folder: Path) -> None:
    """The hidden marker by which `inspect` recognises, and leaves out, a rareaug folder met inside data."""
    (Path(folder) / RAREAUG_MARKER).write_text("made by rareaug; its images are never read as real data\n")


def load_data(config: Config) -> tuple[Dataset, Dataset | None]:
    """Decode the user's data (and --test-data) as the config says; refuse too few rare images, an output
    folder inside the data, and a test folder that is (or holds, or sits in) the training data."""
    data = config.data
    if not data.data:
        where = f"{config.run_dir() / 'split.csv'} does not exist yet" if config.run or config.data.rare else "no data"
        raise RareaugError(f"{where}: pass --data PATH (a folder of class folders, a layout root, or a CSV file) "
                           "to `rareaug inspect` or `rareaug fit` to create the run")
    if config.run or config.data.rare:
        refuse_inside_data(config.run_dir(), "--run", [data.data, data.test_data])
    if data.test_data:
        train_root, test_root = data_folder(data.data), data_folder(data.test_data)
        if train_root == test_root or train_root in test_root.parents or test_root in train_root.parents:
            raise RareaugError(f"--test-data {data.test_data} overlaps --data {data.data} (the same folder, or one "
                               "inside the other): every test image would also be a training image; give a "
                               "separate test folder")
    dataset = load_dataset(Path(data.data), data.layout, data.rare, data.negatives, data.max_per_class,
                           config.seed, data.on_bad_file, data.frame)
    test = None
    if data.test_data:
        test = load_dataset(Path(data.test_data), None, data.rare, data.negatives, None, config.seed, data.on_bad_file,
                            data.frame)
    if test is not None:
        share = duplicated_test_share([r.thumb for r in dataset.records], [r.thumb for r in test.records])
        if share > WHOLESALE_SHARE:
            raise RareaugError(f"--test-data {data.test_data}: {share:.0%} of its images duplicate images in --data "
                               f"{data.data} (near-duplicates): it is a copy of the training data, not a held-out "
                               "test set; give a folder of images that --data does not hold")
    if dataset.rare is not None:
        n_rare = sum(record.is_rare for record in dataset.records)
        if n_rare < MIN_RARE:
            raise RareaugError(f"{dataset.root}: only {n_rare} usable image(s) of the rare class {dataset.rare!r}; "
                               f"at least {MIN_RARE} are needed (20-50 recommended)")
    return dataset, test


def frozen_split(config: Config, given: set[str], dataset: Dataset | None = None,
                 test: Dataset | None = None) -> tuple[list[SplitRow], Config, bool]:
    """Read RUN_DIR/split.csv, or make and write it the first time. Returns rows, the config with the
    split's own data/split settings, and whether the file was written now.

    `given` names the dotted keys the user set on this command line: those must agree with the frozen
    split; everything else is taken from it.
    """
    run = RunDir(config.run_dir())
    if run.split_csv.exists():
        frozen = run.stage_config("split")
        if not frozen.exists():
            raise RareaugError(f"{frozen}: missing; {run.split_csv} cannot be checked. Use a new --run")
        stored = _read_yaml(frozen)
        config = _adopt_split_config(config, stored, given, run)
        return read_split(run.split_csv), config, False
    if dataset is None:
        dataset, test = load_data(config)
    if dataset.rare:  # store the layout's spelling of the class, whatever case the user typed
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, rare=dataset.rare))
    rows = make_split(dataset.records, test.records if test else [], config)
    if config.split.folds > 1:  # refused before it is frozen (one validation split without a rare image: a warning)
        check_rare_validation(rows, config.split.folds, "this split")
    run.path.mkdir(parents=True, exist_ok=True)
    lock_run(run.path)
    if run.split_csv.exists():  # another command froze it while this one decoded the data
        raise RareaugError(f"{run.split_csv} was written by another command meanwhile; run this one again")
    mark_rareaug_folder(run.path)
    split_record = {"seed": config.seed, **{key: value for key, value in stage_record(config, run.salt).items()
                                            if key in ("data", "split")}}
    atomic_write_yaml(run.stage_config("split"), split_record)
    write_split(run.split_csv, rows)
    return rows, config, True


def check_rare_validation(rows: list[SplitRow], folds: int, where: str) -> None:
    """Every fold (or the one validation split) needs a rare image: a threshold is chosen on them."""
    rare_outside_test = sum(1 for r in seen_rows(rows) if r.rare)
    for fold in range(folds):
        if not any(r.rare for r in fold_view(rows, folds, fold).validate):
            fix = (f"use --folds {rare_outside_test} or fewer" if folds > rare_outside_test
                   else "use fewer --folds or more rare images")
            raise RareaugError(f"{'fold ' + str(fold) if folds > 1 else 'validation'} has no rare image in {where} "
                               f"({rare_outside_test} rare image(s) outside test, {folds} fold(s)): no threshold can "
                               f"be chosen; {fix}")


def _adopt_split_config(config: Config, stored: dict, given: set[str], run: RunDir) -> Config:
    """Check the options given now against the frozen split's, then take the split's own values."""
    current = _flat(config)
    frozen = {f"{section}.{key}": value
              for section in ("data", "split") for key, value in stored.get(section, {}).items()}
    for key in sorted(set(SPLIT_KEYS) & given):
        mine, theirs = current[key], frozen.get(key)
        if key in ("data.data", "data.test_data"):
            mine = hash_path(mine, run.salt) if mine else None  # the split stores only a hash of its paths
        elif key == "data.rare" and isinstance(mine, str) and isinstance(theirs, str):
            mine, theirs = mine.lower(), theirs.lower()  # --rare is case-insensitive
        if mine != theirs:
            option = "--" + key.split(".")[1].replace("_", "-")
            if key in ("data.data", "data.test_data"):
                raise RareaugError(f"{run.split_csv} was made from another {option} path; the split is frozen: "
                                   "use a new --run or the same data")
            raise RareaugError(f"{run.split_csv} was made with {option} {frozen.get(key)!r}, this command asks "
                               f"for {current[key]!r}; the split is frozen: use a new --run or the same option")
    kept = {key: value for key, value in stored.get("data", {}).items()
            if key not in ("data", "test_data", "on_bad_file")}
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **kept),
                               split=SplitConfig(**stored.get("split", {})))


def write_data_json(run: RunDir, summary: dict) -> None:
    """What inspect saw, with ids only: a problem keeps its path-free kind, its file becomes a hash (reasons
    can quote file names, and file names can hold patient names or IDs)."""
    content = {key: value for key, value in summary.items() if key not in ("problems", "run")}
    content["problems"] = [
        {"file": hashlib.sha256((run.salt + problem["path"]).encode()).hexdigest()[:12], "kind": problem["kind"]}
        for problem in summary.get("problems", [])
    ]
    atomic_write_json(run.data_json, content)

"""`rareaug sweep-ratio`: classifiers trained on real + r x synthetic rare images, for every ratio, method,
model, seed and fold; metrics on held-out real images with intervals; a ratio recommended on validation.

The test split is never used for training, early stopping, thresholds or the recommendation. Ratio 0 is
one shared baseline per (model, seed, fold), not one per method. Pools are nested, so ratio r's synthetic
images are the first ones of ratio r' > r and the curve measures the amount, not the luck of the draw.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import __version__
from ..config import GENERATE_METHODS, Config, parse_ratios
from ..device import resolve_device
from ..errors import RareaugError
from ..generate.manifest import Manifest, kept_rows
from ..images import model_input
from ..io import atomic_write_json, atomic_write_text, write_csv
from ..run_dir import RunDir, check_rare_validation, frozen_split, timed_stage
from ..split import SplitRow, fold_view, seen_rows
from ..verdicts import GAIN, LOSS, NOISE, TOO_FEW, gain_kind, gain_verdict
from . import metrics as M
from .classifiers import create_classifier, list_classifiers
from .curves import cell_predictions, read_predictions
from .data import CellData, Example, ImageCache, cell_data
from .diversity import Measure, diversity, diversity_measure
from .group import train_group
from .train import class_weights, positive_weight, scores

TEST_METRICS = M.METRICS
METRIC_COLUMNS = ("cell", "method", "model", "ratio", "seed", "fold", "n_real_rare", "n_real_neg", "n_synth", "n_train",
                  "task", "pos_weight_rule", "pos_weight", "threshold", *TEST_METRICS,
                  *(f"{m}_ci_{end}" for m in TEST_METRICS for end in ("low", "high")),
                  "recall_at_0.5", "precision_at_0.5", "f1_at_0.5", "val_f1", "best_step",
                  "n_val_pos", "n_val_neg", "n_test_pos", "n_test_neg", "diversity", "diversity_metric",
                  "intra_cluster")

BASELINE = "none"
PoolMaker = Callable[[Config], tuple[Path, Optional[str]]]  # a pool's config -> (its folder, why it stopped short)
# Where and how cells run, not what they compute (a grouped cell equals the cell alone within float rounding).
EXECUTION = ("executor", "ray_address", "gpus_per_cell", "cpus_per_cell", "group_cells")
GROUP_ON_GPU = 16  # cells trained at once by default on a GPU; on a CPU one at a time


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str  # "none" for ratio 0
    model: str
    ratio: float
    seed: int
    fold: int
    task: str = "binary"

    @property
    def name(self) -> str:
        suffix = "" if self.task == "binary" else f"-{self.task}"
        return f"{self.method}-r{self.ratio:g}-{self.model}-s{self.seed}-f{self.fold}{suffix}"


@dataclasses.dataclass
class SweepPlan:
    """One run's grid, ready to execute: finished cells' results, and the cells still to run."""

    config: Config
    rows: list[SplitRow]
    pools: dict
    run: RunDir
    n_cells: int
    results: list[dict]
    todo: list  # (cell, config hash, make_data) for the cells without a valid done marker
    failed: list[str] = dataclasses.field(default_factory=list)
    skipped: dict = dataclasses.field(default_factory=dict)  # cell name -> why it did not run (a stopped pool)
    weights: dict = dataclasses.field(default_factory=dict)  # model -> where its weights came from


@timed_stage(lambda config: "sweep-ratio")
def sweep(config: Config, make_pool: PoolMaker, given: set[str] = frozenset(), console: Console | None = None) -> dict:
    """Args: make_pool: fills a method's synthetic pool (the generate stage, which the CLI hands in: stages
    never import each other) and returns its folder and why the guard stopped it short, if it did."""
    console = console or Console(stderr=True)
    plan = plan_sweep(config, given, console, make_pool)
    execute([plan], console)
    return finish_sweep(plan, console)


def sweep_classes(configs: list[Config], make_pool: PoolMaker, given: set[str] = frozenset(),
                  console: Console | None = None) -> list[dict]:
    """Several rare classes, each in its own run: with --executor ray all their cells share the cluster at
    once; locally they run one class after another."""
    console = console or Console(stderr=True)
    if configs[0].sweep.executor != "ray":
        return [sweep(config, make_pool, given, console) for config in configs]
    started = time.monotonic()
    plans = [plan_sweep(config, given, console, make_pool) for config in configs]
    execute(plans, console)
    summaries = [finish_sweep(plan, console, raise_failed=False) for plan in plans]
    for plan in plans:  # the classes ran side by side: each run records the shared wall time
        RunDir(plan.config.run_dir()).add_time("sweep-ratio", time.monotonic() - started, "ray")
    failed = [f"{plan.config.data.rare}: {name}" for plan in plans for name in plan.failed]
    if failed:
        raise RareaugError(f"{len(failed)} cell(s) failed ({', '.join(failed[:3])}{'...' if len(failed) > 3 else ''}); "
                           "the others are saved: rerun the same command to retry the failed ones")
    return summaries


def _checked_grid(sw) -> tuple[list[float], list[str], list[str], dict[str, str]]:
    """The grid's ratios, methods and models, each checked (classifier weights too) before anything runs, and
    where each model's weights come from (`Classifier.source`; not known when a Ray cluster's workers load them)."""
    ratios = parse_ratios(sw.ratios)
    methods = [m.strip() for m in sw.methods.split(",") if m.strip()]
    models = [m.strip() for m in sw.models.split(",") if m.strip()]
    for method in methods:
        if method not in GENERATE_METHODS:
            raise RareaugError(f"--methods {method!r} is unknown; choose from {', '.join(GENERATE_METHODS)}")
    known, sources = list_classifiers(), {}
    for model in models:
        if model.removeprefix("tiny-") not in known:
            raise RareaugError(f"--model {model!r} is unknown; choose from {', '.join(known)} (tiny-<name> for tests)")
        # Fail fast: missing ImageNet or CLIP weights stop the sweep here, not after every pool is generated
        # (on a Ray cluster the workers' caches count, not this machine's).
        tiny = model.startswith("tiny-")
        if sw.executor == "ray" and sw.ray_address and sw.pretrained and sw.weights is None and not tiny:
            sources[model] = "the Ray workers' caches"
        else:
            sources[model] = create_classifier(model.removeprefix("tiny-"), pretrained=sw.pretrained,
                                               weights_path=sw.weights, tiny=tiny, clip_model=sw.clip_model).source
    return ratios, methods, models, sources


def _grid_cells(sw, ratios: list[float], methods: list[str], models: list[str], folds: int) -> list[Cell]:
    """Ratio 0 once per (model, seed, fold); every other ratio per method."""
    cells = []
    for model in models:
        for seed in range(sw.seeds):
            for fold in range(folds):
                if 0 in ratios:
                    cells.append(Cell(BASELINE, model, 0.0, seed, fold, sw.task))
                cells += [Cell(method, model, r, seed, fold, sw.task) for method in methods for r in ratios if r > 0]
    return cells


def plan_sweep(config: Config, given: set[str], console: Console, make_pool: PoolMaker) -> SweepPlan:
    sw = config.sweep
    # 1. Check the grid before anything runs.
    ratios, methods, models, sources = _checked_grid(sw)
    rows, config, _ = frozen_split(config, given)
    run, folds = RunDir(config.run_dir()), config.split.folds
    check_rare_validation(rows, folds, str(run.split_csv))  # before any pool is made; old splits were not checked
    run.sweep_cells.mkdir(parents=True, exist_ok=True)
    run.sweep_predictions_folder.mkdir(exist_ok=True)
    run.write_stage_config("sweep", None, config)

    # 2. Synthetic pools, made on demand for the largest ratio once (smaller ratios take its first images).
    pools, stopped = {}, {}
    if any(r > 0 for r in ratios):
        for method in methods:
            for fold in range(folds):
                pools[method, fold], stopped[method, fold] = synthetic_pool(config, rows, method, fold, max(ratios),
                                                                            make_pool)

    # 3. The cells.
    cells = _grid_cells(sw, ratios, methods, models, folds)

    # 4. Each cell is skipped when its result exists under the same config hash.
    split_hash = hashlib.sha256(run.split_csv.read_bytes()).hexdigest()[:16]
    results, todo, skipped = [], [], {}
    for cell in cells:
        if cell.ratio > 0 and len(pools[cell.method, cell.fold]) < _needed(cell, rows, folds):
            skipped[cell.name] = stopped[cell.method, cell.fold]  # the rest of the sweep goes on without it
            continue
        synthetic = _prefix(pools, cell, rows, folds)
        scored = _pool_samples(pools, cell)
        key = _cell_hash(cell, config, split_hash, [f"{e.id}={e.digest}" for e in synthetic + scored])
        marker = run.sweep_cell(cell.name)
        if marker.exists() and json.loads(marker.read_text()).get("hash") == key:
            results.append(json.loads(marker.read_text())["row"])
        else:
            todo.append((cell, key, functools.partial(cell_data, rows, folds, cell.fold, synthetic, scored)))
    if skipped:
        console.print(f"[yellow]sweep-ratio: {len(skipped)} cell(s) skipped, their pools stopped short by the "
                      "memorization guard (see summary.md); the other cells go on[/]", highlight=False, soft_wrap=True)
    return SweepPlan(config, rows, pools, run, len(cells) - len(skipped), results, todo, skipped=skipped,
                     weights=sources)


def execute(plans: list[SweepPlan], console: Console) -> None:
    """Run every plan's pending cells. A result is saved the moment it arrives, so a stopped sweep resumes
    where it was, whichever executor ran it."""
    progress = Progress(TextColumn("sweep-ratio"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[cell]}"),
                        TimeRemainingColumn(), console=console)
    with progress:
        task = progress.add_task("cells", total=sum(plan.n_cells for plan in plans),
                                 completed=sum(len(plan.results) for plan in plans), cell="")

        def finished(plan: SweepPlan, cell: Cell, key: str, row: dict | None, error: str | None) -> None:
            if row is None:
                plan.failed.append(cell.name)
                console.print(f"[red]cell {cell.name} failed:[/] {escape(error)}", highlight=False)
            else:
                atomic_write_json(plan.run.sweep_cell(cell.name), {"hash": key, "row": row})
                plan.results.append(row)
            progress.update(task, advance=1, cell=cell.name)

        if plans[0].config.sweep.executor == "ray":
            from .ray_executor import run_cells_on_ray

            run_cells_on_ray(plans, finished)
            return
        for plan in plans:
            device = resolve_device(plan.config.device)
            caches: dict[int, ImageCache] = {}
            size = plan.config.sweep.group_cells or (GROUP_ON_GPU if device.type == "cuda" else 1)
            for group in _groups(plan.todo, size):
                progress.update(task, cell=group[0][0].name + (f" (+{len(group) - 1})" if len(group) > 1 else ""))
                try:
                    cells = [(cell, data()) for cell, _, data in group]
                    rows = (run_cells(cells, plan.config, caches, device, plan.run) if len(cells) > 1 else
                            [run_cell(*cells[0], plan.config, caches, device, plan.run)])
                except Exception as error:  # one failing cell (or group) must not lose the others
                    for cell, key, _ in group:
                        finished(plan, cell, key, None, f"{type(error).__name__}: {error}\n"
                                                        f"{traceback.format_exc(limit=3)}")
                    continue
                for (cell, key, _), row in zip(group, rows):
                    finished(plan, cell, key, row, None)


def _groups(todo: list, size: int) -> list[list]:
    """Pending cells in runs of at most `size` that share an architecture (they train as one stacked model)."""
    by_model: dict[str, list] = {}
    for item in todo:
        by_model.setdefault(item[0].model, []).append(item)
    return [items[start:start + size] for items in by_model.values() for start in range(0, len(items), size)]


def finish_sweep(plan: SweepPlan, console: Console, raise_failed: bool = True) -> dict:
    """Diversity per synthetic set, metrics.csv, the recommendation."""
    config, run, results, failed = plan.config, plan.run, plan.results, plan.failed
    measure = _add_diversity(results, plan.pools, plan.rows, config)
    if measure is not None and measure.fallback_reason:
        console.print(f"[yellow]sweep-ratio: diversity fell back to 1-MS-SSIM (LPIPS not available: "
                      f"{escape(measure.fallback_reason)})[/]", highlight=False, soft_wrap=True)
    _write_metrics(run.sweep_metrics, results)
    summary = summarise(results, run, config, failed, {row.id: row.group for row in plan.rows if row.group})
    summary["skipped_cells"] = plan.skipped
    summary["diversity_metric"] = measure.metric if measure is not None else None
    summary["classifier_weights"] = plan.weights
    atomic_write_json(run.sweep_summary_json, _strict_json(summary))
    atomic_write_text(run.sweep_summary_md, summary_markdown(summary))
    console.print(f"sweep-ratio: {len(results)} cell(s) in {run.sweep_metrics}; summary in {run.sweep_summary_md}")
    if failed and raise_failed:
        raise RareaugError(f"{len(failed)} cell(s) failed ({', '.join(failed[:3])}{'...' if len(failed) > 3 else ''}); "
                           "the others are saved: rerun the same command to retry the failed ones")
    return summary


def synthetic_pool(config: Config, rows: list[SplitRow], method: str, fold: int, max_ratio: float,
                   make_pool: PoolMaker) -> tuple[list[Example], str | None]:
    """The method's pool for this fold, filled to the largest ratio, as examples in pool order, and why the
    guard stopped it short (None when it is full)."""
    folds = config.split.folds
    n = math.ceil(max_ratio * len(fold_view(rows, folds, fold).rare_train))
    generate_config = dataclasses.replace(config.generate, method=method, n=n, ratio=None,
                                          fold=fold if folds > 1 else None,
                                          steps=config.sweep.generate_steps or config.generate.steps)
    folder, stopped = make_pool(dataclasses.replace(config, generate=generate_config))
    kept = kept_rows(Manifest(folder).rows())
    cls = next(row.cls for row in rows if row.rare)
    return [Example(f"{folder.name}:{row['file'][:-4]}", 1, folder / row["file"], None, "", True, 0,
                    hashlib.sha256((folder / row["file"]).read_bytes()).hexdigest()[:16])
            for row in kept if row["class"] == cls], stopped


def _needed(cell: Cell, rows: list[SplitRow], folds: int) -> int:
    return int(round(cell.ratio * len(fold_view(rows, folds, cell.fold).rare_train)))


def _prefix(pools, cell: Cell, rows: list[SplitRow], folds: int) -> list[Example]:
    """The first ratio x (real rare training images) kept images of the cell's pool."""
    if cell.ratio == 0:
        return []
    return pools[cell.method, cell.fold][:_needed(cell, rows, folds)]


POOL_SAMPLE = 100  # images of each pool a ratio-0 model scores for the pool estimate


def _pool_samples(pools, cell: Cell) -> list[Example]:
    """Ratio-0 cells score the first images of every pool of their fold (trained on none of them)."""
    if cell.ratio != 0:
        return []
    return [e for (method, fold), pool in sorted(pools.items()) if fold == cell.fold for e in pool[:POOL_SAMPLE]]


def _cell_hash(cell: Cell, config: Config, split_hash: str, synthetic_ids: list[str]) -> str:
    sw = dataclasses.asdict(config.sweep)
    for key in ("ratios", "methods", "models", "seeds", "generate_steps", *EXECUTION):
        sw.pop(key)
    recipe = config.recipe
    payload = json.dumps({"cell": cell.name, "sweep": sw, "seed": config.seed, "split": split_hash,
                          "augment": dataclasses.asdict(recipe.augment), "synthetic": synthetic_ids,
                          "inputs": [recipe.crop, recipe.fallback_crop, config.data.frame],
                          "version": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclasses.dataclass
class CellJob:
    """What a cell's training needs: its fresh model, images, positive weight and seed."""

    cell: Cell
    data: CellData
    model: torch.nn.Module
    cache: ImageCache
    pos_weight: float
    weights: torch.Tensor | None
    seed: int


def run_cell(cell: Cell, data: CellData, config: Config, caches: dict, device: torch.device, run: RunDir) -> dict:
    return run_cells([(cell, data)], config, caches, device, run)[0]


def run_cells(cells: list[tuple[Cell, CellData]], config: Config, caches: dict, device: torch.device,
              run: RunDir) -> list[dict]:
    """Cells of one architecture trained at once (sweep/group.py; one cell trains alone, train_cell); each
    result as the row of metrics.csv."""
    jobs = [prepare_cell(cell, data, config, caches) for cell, data in cells]
    outcomes = train_group([j.model for j in jobs], [j.data for j in jobs], jobs[0].cache, config.sweep,
                           config.recipe.augment, [j.pos_weight for j in jobs], [j.seed for j in jobs], device,
                           [j.weights for j in jobs])
    return [finish_cell(job, outcome, config, device, run) for job, outcome in zip(jobs, outcomes)]


def prepare_cell(cell: Cell, data: CellData, config: Config, caches: dict) -> CellJob:
    sw = config.sweep
    if not data.val or not any(e.label for e in data.val):
        raise RareaugError(f"cell {cell.name}: no rare image in validation; the split cannot pick a threshold")
    seed = config.seed * 1000 + cell.seed
    n_classes = 1 + max(e.target for e in data.train + data.val)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the head's (and, without --pretrained, the backbone's) initial weights
        model = create_classifier(cell.model.removeprefix("tiny-"), pretrained=sw.pretrained, weights_path=sw.weights,
                                  tiny=cell.model.startswith("tiny-"), clip_model=sw.clip_model,
                                  num_outputs=n_classes if sw.task == "multiclass" else 1)
    # Small images (32-px Fashion-MNIST) can be fed at their own size: a ResNet at 32 px trains ~50x faster than at 224.
    size = sw.input_size or model.input_size
    cache = caches.setdefault(size, ImageCache(config.recipe, size, config.data.frame))
    real_train = [e for e in data.train if not e.synthetic]
    pos_weight = positive_weight(sw.pos_weight, data, real_train)
    weights = class_weights(sw.pos_weight, data, real_train, n_classes) if sw.task == "multiclass" else None
    if weights is not None:
        pos_weight = float(weights[0])  # the rare class's weight, reported in the same column
    return CellJob(cell, data, model, cache, pos_weight, weights, seed)


def finish_cell(job: CellJob, outcome, config: Config, device: torch.device, run: RunDir) -> dict:
    """Threshold from validation, test metrics with intervals, the pool's scores, the predictions file."""
    cell, data, model, cache, pos_weight, seed, sw = (job.cell, job.data, job.model, job.cache, job.pos_weight,
                                                      job.seed, config.sweep)
    val_labels = [e.label for e in data.val]
    test_labels = [e.label for e in data.test]
    threshold = M.choose_threshold(val_labels, outcome.val_scores, sw.threshold_rule, sw.target_sensitivity)
    val = M.binary_metrics(val_labels, outcome.val_scores, threshold)
    test = M.binary_metrics(test_labels, outcome.test_scores, threshold)
    half = M.binary_metrics(test_labels, outcome.test_scores, 0.5)
    if not any(test_labels):  # no rare test image: recall and F1 are undefined, not 0
        for metrics in (test, half):
            metrics.update(recall=float("nan"), f1=float("nan"))
    groups = [e.group or e.id for e in data.test]
    intervals = M.bootstrap_intervals(test_labels, outcome.test_scores, threshold, groups, sw.bootstrap, seed)
    pool_scores = scores(model, data.scored, cache, device) if data.scored else []
    _write_predictions(run.sweep_predictions(cell.name), data, outcome, pool_scores)
    return {
        "cell": cell.name, "method": cell.method, "model": cell.model, "ratio": cell.ratio, "seed": cell.seed,
        "fold": cell.fold, "n_real_rare": data.n_real_rare, "n_synth": data.n_synth, "n_train": len(data.train),
        "task": sw.task, "pos_weight_rule": sw.pos_weight, "pos_weight": pos_weight, "threshold": threshold,
        **{key: test[key] for key in TEST_METRICS},
        **{f"{key}_ci_{end}": intervals[key][i] for key in TEST_METRICS for i, end in enumerate(("low", "high"))},
        "n_real_neg": sum(1 for e in data.train if not e.synthetic and not e.label), "n_val_pos": val["n_pos"],
        "n_val_neg": val["n_neg"],
        "recall_at_0.5": half["recall"], "precision_at_0.5": half["precision"], "f1_at_0.5": half["f1"],
        "val_f1": val["f1"], "best_step": outcome.best_step, "n_test_pos": test["n_pos"], "n_test_neg": test["n_neg"],
    }


def _write_predictions(path: Path, data: CellData, outcome, pool_scores: list[float]) -> None:
    parts = (("val", data.val, outcome.val_scores), ("test", data.test, outcome.test_scores),
             ("pool", data.scored, pool_scores))
    write_csv(path, ("id", "split", "label", "score"),
              ([example.id, split, example.label, f"{score:.6g}"]
               for split, examples, values in parts for example, score in zip(examples, values)))


def _add_diversity(results: list[dict], pools, rows: list[SplitRow], config: Config) -> Measure | None:
    """One figure per (method, ratio, fold) synthetic set, shared by its cells. Returns the measure used (None
    when no synthetic set was measured)."""
    cache: dict = {}
    reals, measure = None, None
    for row in results:
        if row["method"] == BASELINE:
            row.update(diversity=float("nan"), diversity_metric="", intra_cluster=float("nan"))
            continue
        key = (row["method"], row["ratio"], row["fold"])
        if key not in cache:
            cell = Cell(row["method"], row["model"], row["ratio"], row["seed"], row["fold"])
            images = _prefix(pools, cell, rows, config.split.folds)
            if reals is None:
                reals = torch.stack([model_input(r.abs_path, 64, "center") / 2 + 0.5 for r in seen_rows(rows)
                                     if r.rare])
            stacked = torch.stack([model_input(e.path, 64, "center") / 2 + 0.5 for e in images]) if images else None
            if stacked is not None and len(stacked) > 1 and measure is None:
                measure = diversity_measure()  # once: LPIPS loads (or is found missing) once per sweep
            cache[key] = diversity(stacked, reals, measure=measure) if stacked is not None else {
                "diversity": float("nan"), "diversity_metric": "", "intra_cluster": float("nan")}
        row.update(cache[key])
    return measure


def _write_metrics(path: Path, results: list[dict]) -> None:
    ordered = sorted(results, key=lambda r: (r["model"], r["method"] != BASELINE, r["method"], r["ratio"], r["seed"],
                                             r["fold"]))
    write_csv(path, METRIC_COLUMNS, ({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
                                     for row in ordered))


# --- the recommendation ------------------------------------------------------------------------------

def summarise(results: list[dict], run: RunDir, config: Config, failed: list[str],
              group_of: dict[str, str] | None = None) -> dict:
    """Per model and method: the ratio with the best validation F1 (pooled out-of-fold validation
    predictions, averaged over seeds), its test metrics, and whether its gain over ratio 0 on test is
    distinguishable from noise (a bootstrap over runs and test images, see _gain)."""
    sw = config.sweep
    summary = {"rareaug_version": __version__, "failed_cells": failed, "pos_weight_rule": sw.pos_weight,
               "decision_rule": ("recommended ratio = highest mean validation F1 (pooled out-of-fold validation "
                                 "predictions, threshold chosen on them, averaged over seeds; ties go to the "
                                 "smaller ratio); the test set never takes part. Gain over ratio 0 = test F1 "
                                 "of the same models at those thresholds, averaged over seeds and folds; it is "
                                 "distinguishable from noise when its 95% two-level paired bootstrap interval "
                                 "(runs = seeds x folds, and test images, whole patients when known) excludes 0, "
                                 f"with at least {MIN_RUNS} runs per cell (fewer: too few runs to judge)."),
               "models": {}}
    by_model = {}
    for row in results:
        by_model.setdefault(row["model"], []).append(row)
    for model, rows in by_model.items():
        baseline = [r for r in rows if r["method"] == BASELINE]
        methods = sorted({r["method"] for r in rows} - {BASELINE})
        summary["models"][model] = {}
        for method in methods or [BASELINE]:
            table = {}
            for ratio in sorted({r["ratio"] for r in rows if r["method"] in (method, BASELINE)}):
                cells = [r for r in (baseline if ratio == 0 else rows) if r["ratio"] == ratio
                         and (ratio == 0 or r["method"] == method)]
                if cells:
                    table[ratio] = _ratio_summary(cells, run, sw)
            if not table:
                continue
            best = max(table, key=lambda r: (round(table[r]["val_f1"], 9), -r))
            entry = {"ratios": {f"{r:g}": v for r, v in table.items()}, "recommended_ratio": best}
            if best != 0 and 0 in table:
                entry["gain_over_ratio_0"] = _gain(rows, baseline, method, best, run, sw, group_of or {})
            entry["synthetic_helps"] = best != 0 and entry.get("gain_over_ratio_0", {}).get("verdict") == GAIN
            summary["models"][model][method] = entry
    summary["pool_estimates"] = pool_estimates(results, run)
    return summary


def pool_estimates(results: list[dict], run: RunDir) -> dict:
    """Per model and pool: the share of the pool's first images that the ratio-0 models (real data only) call
    the rare class at their validation thresholds, averaged over seeds and folds. An estimate of fidelity by
    a classifier of the user's own real images, with that classifier's errors in it."""
    shares: dict = {}
    for row in results:
        if row["method"] != BASELINE:
            continue
        by_pool: dict = {}
        for prediction in read_predictions(run, row["cell"]):
            if prediction["split"] == "pool":
                by_pool.setdefault(prediction["id"].rsplit(":", 1)[0], []).append(float(prediction["score"]))
        for variant, values in by_pool.items():
            found = shares.setdefault(row["model"], {}).setdefault(variant, {"shares": [], "images": len(values)})
            found["shares"].append(float(np.mean(np.asarray(values) >= row["threshold"])))
    return {model: {variant: {"judged_rare": float(np.mean(v["shares"])), "images": v["images"],
                              "cells": len(v["shares"])} for variant, v in sorted(by.items())}
            for model, by in shares.items()}


def _ratio_summary(cells: list[dict], run: RunDir, sw) -> dict:
    """Validation F1 and the threshold from each seed's pooled out-of-fold validation predictions; test F1
    of every fold's model at its seed's pooled threshold; and the per-cell test metrics, mean and sd."""
    val_f1, thresholds, test_f1_pooled_threshold = [], [], []
    for seed, threshold in _pooled_thresholds(cells, run, sw).items():
        labels, values = _pooled(cells, seed, "val", run)
        val_f1.append(M.binary_metrics(labels, values, threshold)["f1"])
        thresholds.append(threshold)
        for cell in (c for c in cells if c["seed"] == seed):
            rows = cell_predictions(run, cell["cell"], "test")
            test_f1_pooled_threshold.append(M.binary_metrics([int(r["label"]) for r in rows],
                                                             [float(r["score"]) for r in rows], threshold)["f1"])
    diversity = [value for c in cells if c.get("diversity") not in (None, "")
                 and math.isfinite(value := float(c["diversity"]))]
    entry = {"val_f1": float(np.mean(val_f1)), "n_cells": len(cells), "n_synth": cells[0]["n_synth"],
             "threshold_pooled_val": float(np.mean(thresholds)),
             "test_f1_at_pooled_threshold_mean": float(np.mean(test_f1_pooled_threshold)),
             "diversity": float(np.mean(diversity)) if diversity else None}
    for key in ("f1", "recall", "precision", "pr_auc", "auroc", "sens_at_95spec"):
        mean, sd = M.mean_sd([c[key] for c in cells])
        entry[f"test_{key}_mean"], entry[f"test_{key}_sd"] = mean, sd
    return entry


def _pooled_thresholds(cells: list[dict], run: RunDir, sw) -> dict[int, float]:
    """Each seed's threshold, chosen on its pooled out-of-fold validation predictions."""
    thresholds = {}
    for seed in sorted({c["seed"] for c in cells}):
        labels, values = _pooled(cells, seed, "val", run)
        thresholds[seed] = M.choose_threshold(labels, values, sw.threshold_rule, sw.target_sensitivity)
    return thresholds


def _pooled(cells: list[dict], seed: int, split: str, run: RunDir) -> tuple[list[int], list[float]]:
    labels, values = [], []
    for cell in cells:
        if cell["seed"] != seed:
            continue
        for row in read_predictions(run, cell["cell"]):
            if row["split"] == split:
                labels.append(int(row["label"]))
                values.append(float(row["score"]))
    return labels, values


MIN_RUNS = 3  # fewer (seed, fold) runs per cell cannot say how much training noise moves the gain


def _gain(rows, baseline, method, ratio, run: RunDir, sw, group_of: dict[str, str]) -> dict:
    """Test F1 of the recommended ratio minus ratio 0, for the models and thresholds the table reports:
    every (seed, fold) model at its seed's pooled-validation threshold, F1 averaged over those models.

    The 95% interval is a two-level paired bootstrap: each resample draws the runs (seed x fold pairs, the
    same runs for both sides) and the test images (whole patients when known), so it counts training noise
    as well as test-set sampling. Resampling test images alone called gains real that a rerun with other seeds
    reversed. The gain is distinguishable from noise when the interval excludes 0, and never with fewer than
    MIN_RUNS runs."""
    chosen = [r for r in rows if r["method"] == method and r["ratio"] == ratio]
    runs = sorted({(r["seed"], r["fold"]) for r in baseline} & {(r["seed"], r["fold"]) for r in chosen})
    baseline = sorted((r for r in baseline if (r["seed"], r["fold"]) in runs), key=lambda r: (r["seed"], r["fold"]))
    chosen = sorted((r for r in chosen if (r["seed"], r["fold"]) in runs), key=lambda r: (r["seed"], r["fold"]))
    ids, labels, before = _test_decisions(baseline, run, sw)
    ids_b, _, after = _test_decisions(chosen, run, sw)
    if ids != ids_b:
        return {"error": "ratio 0 and the chosen ratio were tested on different images"}
    groups = [group_of.get(i, i) for i in ids]
    kind = f"seeds x folds x test {'patients' if group_of else 'images'}"
    low, high = M.two_level_interval(before, after, labels, groups, sw.bootstrap)
    diff = M.mean_f1(after, labels) - M.mean_f1(before, labels)
    enough = len(runs) >= MIN_RUNS
    distinguishable = enough and bool(low > 0 or high < 0)
    verdict = (TOO_FEW if not enough else GAIN if distinguishable and low > 0
               else LOSS if distinguishable else NOISE)
    return {"diff": float(diff), "low": float(low), "high": float(high), "distinguishable": distinguishable,
            "verdict": verdict, "runs": len(runs), "interval_kind": kind}


def _test_decisions(cells: list[dict], run: RunDir, sw) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(test ids, labels, decisions[cell, image]) with each seed's pooled-validation threshold."""
    thresholds = _pooled_thresholds(cells, run, sw)
    ids, labels, decisions = None, None, []
    for cell in cells:
        rows = cell_predictions(run, cell["cell"], "test")
        ids = ids or [r["id"] for r in rows]
        labels = np.array([int(r["label"]) for r in rows], dtype=bool)
        decisions.append(np.array([float(r["score"]) >= thresholds[cell["seed"]] for r in rows]))
    return ids, labels, np.stack(decisions)


def _strict_json(value):
    """NaN and infinities become null: summary.json is read by other tools, and strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_strict_json(item) for item in value]
    return value


DIVERSITY_NAMES = {"lpips_alex": "mean pairwise LPIPS (AlexNet) between the synthetic images",
                   "1-ms_ssim": "mean pairwise 1 - MS-SSIM between the synthetic images (the fallback: LPIPS's "
                                "AlexNet weights were neither cached nor downloadable when the sweep ran)"}


def summary_markdown(summary: dict) -> str:
    lines = ["# Ratio sweep", "", summary["decision_rule"], ""]
    metric = summary.get("diversity_metric")
    if metric:
        lines += [f"Diversity (`{metric}`): {DIVERSITY_NAMES.get(metric, metric)}; higher = more varied.", ""]
    if summary.get("classifier_weights"):
        lines += ["Classifier weights: " + ", ".join(f"{model} from {source}" for model, source
                                                     in summary["classifier_weights"].items()) + ".", ""]
    if summary["failed_cells"]:
        lines += [f"**Failed cells** (rerun to retry): {', '.join(summary['failed_cells'])}", ""]
    for reason in sorted(set(summary.get("skipped_cells", {}).values())):
        names = [name for name, why in summary["skipped_cells"].items() if why == reason]
        lines += [f"**Skipped cells** ({reason}): {', '.join(names)}", ""]
    by = f" ({metric})" if metric else ""
    for model, methods in summary["models"].items():
        for method, entry in methods.items():
            lines += [f"## {model} · {method}", "",
                      f"| ratio | synthetic | val F1 | test F1 | test recall | test PR-AUC | diversity{by} |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for ratio, r in entry["ratios"].items():
                mark = " **←**" if float(ratio) == entry["recommended_ratio"] else ""
                spread = f"{r['diversity']:.3f}" if r.get("diversity") is not None else "—"
                lines.append(f"| {ratio}×{mark} | {r['n_synth']} | {r['val_f1']:.3f} | {r['test_f1_mean']:.3f} ± "
                             f"{r['test_f1_sd']:.3f} | {r['test_recall_mean']:.3f} | {r['test_pr_auc_mean']:.3f} | "
                             f"{spread} |")
            gain = entry.get("gain_over_ratio_0")
            lines.append("")
            if entry["recommended_ratio"] == 0:
                lines.append("Recommendation: **no synthetic data** (ratio 0 had the best validation F1).")
            elif "0" not in entry["ratios"]:
                lines.append(f"Recommendation: **{entry['recommended_ratio']:g}×** among the ratios swept; ratio 0 "
                             "was not in --ratios, so there is no baseline to say whether synthetic data helps.")
            elif gain and "diff" in gain:
                lines.append(f"Recommendation: **{entry['recommended_ratio']:g}×**. Test F1 gain over ratio 0: "
                             f"{gain['diff']:+.3f} (95% interval over {gain_kind(gain)}: {gain['low']:+.3f} to "
                             f"{gain['high']:+.3f}): **{gain_verdict(gain)}**.")
            lines.append("")
    for model, pools in summary.get("pool_estimates", {}).items():
        lines += [f"## Pools judged by {model} trained on real images only (an estimate)", "",
                  "Share of each pool's first images that the ratio-0 models call the rare class at their "
                  "validation thresholds (mean over seeds and folds); their own errors are in it.", "",
                  "| pool | images | judged rare (estimate) |", "| --- | --- | --- |"]
        lines += [f"| {variant} | {e['images']} | {e['judged_rare']:.0%} |" for variant, e in pools.items()]
        lines.append("")
    return "\n".join(lines) + "\n"

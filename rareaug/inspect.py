"""`rareaug inspect`: what is in the data, how it splits, and what is wrong with it — before any training."""
from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from data_adapters import Dataset

from .config import Config
from .models.adapted import finished_variants, read_meta
from .near_duplicates import find_leaks
from .run_dir import FEW_RARE, RunDir, frozen_split, load_data, write_data_json
from .split import SPLITS, SplitRow, make_split, split_counts


def inspect_data(config: Config, given: set[str] = frozenset()) -> dict:
    """Decode every image once, split (frozen in RUN_DIR when --run is given) and summarise."""
    # 1. Read and decode the data.
    dataset, test = load_data(config)
    records = dataset.records + (test.records if test else [])

    # 2. The split: frozen in the run directory when there is one, else computed in memory only.
    split_file = None
    if config.run:
        rows, config, written = frozen_split(config, given, dataset, test)
        split_file = "written" if written else "read"
    else:
        rows = make_split(dataset.records, test.records if test else [], config)

    # 3. Summarise; leakage is judged on the thumbnails of this decode.
    summary = summarise(dataset, records, rows, config)
    summary["split_file"] = split_file
    if config.run:
        summary["run"] = str(config.run_dir())
        write_data_json(RunDir(config.run_dir()), summary)
        summary["adapted"] = adapted_summary(RunDir(config.run_dir()))
    return summary


def adapted_summary(run: RunDir) -> dict:
    """Per adapted model of the run: its conditioning, and what its --unlabeled folder held and what was refused."""
    found = {}
    for variant in finished_variants(run.adapted_root):
        meta = read_meta(run.adapted(variant))
        found[variant] = {"conditioning": meta["conditioning"], "base_model": meta["base_model_label"],
                          "unlabeled": meta["unlabeled"]}
    return found


def summarise(dataset: Dataset, records, rows: list[SplitRow], config: Config) -> dict:
    id_of = {(row.root, row.path): row.id for row in rows}
    thumbs = {id_of.get((r.root.as_posix(), r.rel_path)): r.thumb for r in records}
    thumbs.pop(None, None)
    leaks, rule = find_leaks(rows, thumbs, config.seed)
    n_rare = sum(row.rare for row in rows) if dataset.rare else None
    patients = {row.group for row in rows if row.group}
    sizes = Counter((r.width, r.height) for r in records)
    problems = [{"path": p.path, "reason": p.reason, "kind": p.kind} for p in dataset.problems]

    warnings = []
    if n_rare is not None and n_rare < FEW_RARE:
        warnings.append(f"only {n_rare} rare images: results will be noisy (20-50 recommended)")
    if dataset.rare:
        for split in ("val", "test"):
            if not any(row.rare and row.split == split for row in rows):
                warnings.append(f"no rare image in {split}: the rare images come from too few patients to split "
                                f"them (or --max-rare is too small); {split} figures for the rare class will be "
                                "missing")
        if not any(not row.rare for row in rows):
            warnings.append("no negative images: only the rare class was found; a classifier needs other images too")
    if leaks:
        warnings.append(leak_warning(leaks, rule))
    return {
        "layout": dataset.layout,
        "recipe": config.recipe.name,
        "classes": dataset.classes,
        "rare": dataset.rare,
        "n_rare": n_rare,
        "n_images": len(rows),
        "n_patients": len(patients) if dataset.patients_known else None,
        "splits": split_counts(rows),
        "folds": config.split.folds,
        "sizes": {
            "min": [min(w for w, _ in sizes), min(h for _, h in sizes)],
            "max": [max(w for w, _ in sizes), max(h for _, h in sizes)],
            "most_common": [list(sizes.most_common(1)[0][0]), sizes.most_common(1)[0][1]],
        },
        "modes": dict(Counter(r.mode for r in records).most_common()),
        "bit_depths": {str(bits): n for bits, n in sorted(Counter(r.bit_depth for r in records).items())},
        "problems": problems,
        "warnings": warnings,
        "leaks": leaks,
        "near_duplicate_rule": rule,
    }


SHOWN_LEAKS = 3


def leak_warning(leaks: list[dict], rule: dict) -> str:
    """One line for every near-duplicate pair across splits: the count and the closest pairs; data.json lists all."""
    shown = "; ".join(f"{leak['a']} ({leak['a_split']}) ~ {leak['b']} ({leak['b_split']}) at {leak['distance']:.4f}"
                      for leak in leaks[:SHOWN_LEAKS])
    count = rule.get("pairs", len(leaks))
    more = f" and {count - SHOWN_LEAKS} more" if count > SHOWN_LEAKS else ""
    typical = rule["typical_second_nearest"]
    scale = (f"the data's typical pair is at {typical:.4f}" if typical is not None
             else "too few images to calibrate on")
    return (f"possible leakage: {count} near-duplicate pair(s) across splits (thumbnails closer than "
            f"{rule['threshold']:.4f}, {scale}): "
            f"{shown}{more}; every pair is listed under leaks (the run's data.json, or --json). Where two are the "
            "same picture, keep one of them in the data")


def render(summary: dict, console: Console) -> None:
    """The human view: one table of classes by split, then facts, problems and warnings. Every name that comes
    from the user's files is escaped: rich would read a file called `[bold]x.png` as markup and show `x.png`."""
    rare = summary["rare"]
    title = (f"{escape(str(summary['layout']))} layout · recipe {escape(str(summary['recipe']))}"
             + (f" · rare class: {escape(rare)}" if rare else ""))
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    for split in SPLITS:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    classes = sorted({cls for counts in summary["splits"].values() for cls in counts}, key=lambda c: (c != rare, c))
    for cls in classes:
        counts = [summary["splits"][split].get(cls, 0) for split in SPLITS]
        name = f"[bold magenta]{escape(cls)}[/] (rare)" if cls == rare else escape(cls)
        table.add_row(name, *map(str, counts), str(sum(counts)))
    console.print(table)

    sizes = summary["sizes"]
    patients = summary["n_patients"]
    console.print(f"images: {summary['n_images']}   patients: {patients if patients is not None else 'unknown'}   "
                  f"folds: {summary['folds']}")
    console.print(f"sizes: {sizes['min'][0]}x{sizes['min'][1]} to {sizes['max'][0]}x{sizes['max'][1]}, "
                  f"most often {sizes['most_common'][0][0]}x{sizes['most_common'][0][1]}")
    console.print("modes: " + ", ".join(f"{mode} ({n})" for mode, n in summary["modes"].items())
                  + "   bit depths: " + ", ".join(f"{bits} ({n})" for bits, n in summary["bit_depths"].items()))
    if len(summary["classes"]) > len(classes):
        unused = {c: n for c, n in summary["classes"].items() if c not in classes}
        console.print("[dim]not used with these options: " + ", ".join(f"{escape(c)} ({n})" for c, n in unused.items())
                      + "[/]")
    problems = summary["problems"]
    if problems:
        console.print(f"[yellow]{len(problems)} file(s) skipped:[/]")
        for problem in problems[:20]:
            console.print(f"  [yellow]{escape(problem['path'])}[/]: {escape(problem['reason'])}", highlight=False)
        if len(problems) > 20:
            console.print(f"  ... and {len(problems) - 20} more (see --json)")
    for warning in summary["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    for variant, entry in summary.get("adapted", {}).items():
        unlabeled = entry["unlabeled"]
        refused = "; ".join(f"fold {part['fold']}: used {part['used']}, refused "
                            f"{part.get('near_duplicates_of_held_out', 0)} near-copies of held-out images and "
                            f"{part.get('held_out_patients', 0)} of held-out patients" for part in unlabeled["parts"])
        console.print(f"adapted:{escape(variant)} ({escape(entry['conditioning'])} on {escape(entry['base_model'])}): "
                      f"--unlabeled held {unlabeled['found']} readable image(s), {unlabeled['unreadable']} unreadable"
                      + (f"; {refused}" if unlabeled["found"] else ""), highlight=False)
    if summary.get("split_file") == "written":
        console.print(f"split frozen in {escape(str(summary['run']))}/split.csv")
    elif summary.get("split_file") == "read":
        console.print(f"split read from {escape(str(summary['run']))}/split.csv (frozen)")

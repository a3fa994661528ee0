"""Evidence on real images: does rareaug's synthetic data lift rare-class recall and F1 on a held-out real test set?

    python bench/evidence.py --rare pullover --k 20            # full: ratios 0,1,2,4,10,20 x 3 seeds
    python bench/evidence.py --rare pullover --k 20 --quick    # ratios 0,2,10 x 1 seed (<= 20 min on 2 CPU cores)

Training data: k real training images of the rare class (split into train and validation by the split rules)
plus 300 real images of each of the other nine classes, a seeded draw from Fashion-MNIST's training set. Test
data: the whole real Fashion-MNIST test set (1,000 images of the rare class, 9,000 others), given to rareaug
as --test-data, so it never takes part in training, thresholds or the recommended ratio.

It runs the CLI a user would run, on the shipped `rareaug-mini` base model (which never saw the four rare
classes): `fit` for loft, datadream and chimera, then `sweep-ratio` (ResNet18 from scratch at 32 px; pools are
generated on demand; ratio 0 and the `classic`, `classprompt` and `img2img` (real images noised to strength 0.5 and
denoised with the class prompt on the base model) baselines included), and writes
bench/results/evidence-<class>-k<k>[-quick].md (and .json) with every command, the versions and the device.
A rerun resumes: finished LoRAs, pools and cells are kept.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rareaug  # noqa: E402
from rareaug.config import LORA_METHODS  # noqa: E402
from rareaug.device import device_label, resolve_device  # noqa: E402
from rareaug.io import atomic_write_text, read_json  # noqa: E402
from rareaug.models.mini import MINI_FOLDER  # noqa: E402
from rareaug.report.gather import package_versions, read_pools  # noqa: E402
from rareaug.run_dir import RunDir  # noqa: E402
from rareaug.samples.fashion_mnist import CLASSES, RARE_CLASSES, load_fashion_mnist, seeded_subset, write_class_folders  # noqa: E402
from rareaug.split import read_split  # noqa: E402
from rareaug.sweep.curves import cells_at, group_intervals, patient_groups  # noqa: E402
from rareaug.verdicts import gain_kind, gain_verdict  # noqa: E402

BASELINES = ("classprompt", "img2img", "classic")
FULL_RATIOS, QUICK_RATIOS = "0,1,2,4,10,20", "0,2,10"
N_OTHER = 300
SHOWN = ("f1", "recall", "pr_auc")
VERSIONS = ("rareaug", "torch", "torchvision", "diffusers", "transformers", "peft", "scikit-learn", "numpy")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rare", required=True, choices=RARE_CLASSES)
    parser.add_argument("--k", type=int, default=20, help="real rare training images (train + validation)")
    parser.add_argument("--seeds", type=int, default=None, help="classifier seeds per cell (3; --quick 1)")
    parser.add_argument("--folds", type=int, default=1,
                        help="cross-validation folds over the k images (1: one val split)")
    parser.add_argument("--quick", action="store_true", help=f"ratios {QUICK_RATIOS} and 1 seed")
    parser.add_argument("--ratios", default=None, help=f"override the ratios ({FULL_RATIOS})")
    parser.add_argument("--sweep-steps", type=int, default=None, help="classifier steps per cell (recipe: 500)")
    parser.add_argument("--fit-steps", type=int, default=None, help="LoRA steps (method defaults); for smoke runs")
    parser.add_argument("--test-per-class", type=int, default=None,
                        help="a seeded subset of the test set (default: all 1,000 per class); for smoke runs")
    parser.add_argument("--other-per-class", type=int, default=N_OTHER,
                        help=f"real training images of each other class (default {N_OTHER}); fewer for smoke runs")
    parser.add_argument("--methods", default=",".join(LORA_METHODS + BASELINES),
                        help="synthetic sources to compare (default all six); LoRA methods are fitted")
    parser.add_argument("--adapt", default=None, choices=("labels", "domain", "language-free"),
                        help="first `rareaug adapt` the base model on the run's training images (every class) with "
                             "this conditioning, then fit and sample every method on it; the results are written "
                             "next to the unadapted run's, with a side-by-side table when that one is there")
    parser.add_argument("--adapt-steps", type=int, default=1500, help="adapt steps per fold")
    parser.add_argument("--adapt-rank", type=int, default=0, help="adapt --rank (0: the whole UNet; mini is small)")
    parser.add_argument("--adapt-lr", type=float, default=1e-4, help="adapt --lr")
    parser.add_argument("--label", default=None, help="suffix of the result files, e.g. cpu for a reduced protocol")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--in-process", action="store_true",
                        help="run the rareaug commands in this process (no start-up per command; smoke runs)")
    parser.add_argument("--work", type=Path, default=None,
                        help="run folder (default runs/evidence-<class>-k<k>[-quick])")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.k < 5:
        parser.error("--k must be at least 5: the split needs rare images in train and validation")
    seeds = args.seeds or (1 if args.quick else 3)
    ratios = args.ratios or (QUICK_RATIOS if args.quick else FULL_RATIOS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(LORA_METHODS + BASELINES))
    if unknown or not methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from "
                     f"{', '.join(LORA_METHODS + BASELINES)}")
    plain_tag = (f"evidence-{args.rare}-k{args.k}" + ("-quick" if args.quick else "")
                 + (f"-{args.label}" if args.label else ""))
    tag = plain_tag + (f"-adapt-{args.adapt}" if args.adapt else "")
    work = args.work or ROOT / "runs" / tag
    started = time.monotonic()

    # 1. Real data: the training draw and the whole test set, as class folders.
    shared = args.work.parent if args.work else ROOT / "runs"  # the test set is shared by every class and k
    data, test = write_data(work, shared, args.rare, args.k, args.test_per_class, parser.error, args.other_per_class)

    # 2. The commands a user would run (paths relative to the repository when they are inside it: cwd is ROOT).
    run, data, test = (_relative(path) for path in (work / "run", data, test))
    common = ["--config", "fashion_mnist", "--run", str(run), "--device", args.device]
    split = ["--data", str(data), "--test-data", str(test), "--rare", args.rare, "--folds", str(args.folds)]
    fit_steps = ["--steps", str(args.fit_steps)] if args.fit_steps else []
    commands = []
    if args.adapt:  # one adapted base per fold, on the images outside it; every method then fits and samples on it
        commands.append(["adapt", *common, *split, "--conditioning", args.adapt, "--steps", str(args.adapt_steps),
                         "--rank", str(args.adapt_rank), "--lr", str(args.adapt_lr)])
        fit_steps += ["--base-model", "adapted"]
    commands += [["fit", *common, *split, "--method", method, *fit_steps]
                 for method in LORA_METHODS if method in methods]
    sweep = ["sweep-ratio", *common, "--folds", str(args.folds), "--methods", ",".join(methods),
             "--seeds", str(seeds), "--ratios", ratios]
    if args.sweep_steps:
        sweep += ["--steps", str(args.sweep_steps)]
    commands.append(sweep)
    minutes = {}
    for command in commands:
        t0 = time.monotonic()
        run_rareaug(command, args.in_process)
        name = f"fit {command[command.index('--method') + 1]}" if command[0] == "fit" else command[0]
        minutes[name] = (time.monotonic() - t0) / 60
        print(json.dumps({"stage": name, "minutes": round(minutes[name], 2)}), flush=True)

    # 3. The evidence.
    evidence = collect(ROOT / run, args, seeds, ratios, minutes, (time.monotonic() - started) / 60,
                       " ".join(["python", "bench/evidence.py", *(sys.argv[1:] if argv is None else argv)]), commands)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / f"{tag}.json", json.dumps(_no_nan(evidence), indent=1, default=_plain) + "\n")
    unadapted = args.out_dir / f"{plain_tag}.json"
    side_by_side = (json.loads(unadapted.read_text()) if args.adapt and unadapted.is_file() else None)
    atomic_write_text(args.out_dir / f"{tag}.md", markdown(evidence) + (
        adapted_side_by_side(evidence, side_by_side) if side_by_side else ""))
    print(f"wrote {args.out_dir / (tag + '.md')}", flush=True)


def run_rareaug(command: list[str], in_process: bool = False) -> None:
    """Print and run one `rareaug` command from the repository root, as a user would type it: in a fresh Python
    (the default: each stage starts clean) or in this one (`--in-process`, ~10 s of imports less a command)."""
    print("$ rareaug " + " ".join(command), flush=True)
    if not in_process:
        subprocess.run([sys.executable, "-m", "rareaug", *command], check=True, cwd=ROOT)
        return
    import os

    from rareaug.cli import app

    previous = os.getcwd()
    os.chdir(ROOT)
    try:
        code = app(command, standalone_mode=False)
    finally:
        os.chdir(previous)
    if code:
        raise subprocess.CalledProcessError(code, ["rareaug", *command])


def write_data(work: Path, shared: Path, rare: str, k: int, test_per_class: int | None, fail,
               other: int = N_OTHER) -> tuple[Path, Path]:
    """The evidence split's real images as class folders: k rare + `other` of each other class (a seeded draw
    from the training set) in work/data, and the test set (all of it, or a seeded subset) under `shared`."""
    data = work / "data"
    test = shared / ("evidence-test" if test_per_class is None else f"evidence-test-{test_per_class}")
    counts = {name: (k if name == rare else other) for name in CLASSES}
    images, labels = load_fashion_mnist("train")
    draw = seeded_subset(labels, counts, seed=0)
    write_class_folders(data, "train", draw, images, labels)
    expected = {f"{CLASSES[labels[i]]}/fm-train-{i:05d}.png" for i in draw.tolist()}
    found = {p.relative_to(data).as_posix() for p in data.rglob("*.png")}
    if found != expected:
        fail(f"{data} holds another draw ({len(found - expected)} images not in this one); use a new --work")
    test_images, test_labels = load_fashion_mnist("test")
    chosen = (np.arange(len(test_labels)) if test_per_class is None else
              seeded_subset(test_labels, {name: test_per_class for name in CLASSES}, seed=0))
    write_class_folders(test, "test", chosen, test_images, test_labels)
    print(f"data: {sum(counts.values())} training images in {data}; {len(chosen)} test images in {test}", flush=True)
    return data, test


def collect(run: Path, args, seeds: int, ratios: str, minutes: dict, total: float, command: str, commands) -> dict:
    summary = json.loads((run / "sweep" / "summary.json").read_text())
    with open(run / "sweep" / "metrics.csv", newline="") as handle:
        cells = list(csv.DictReader(handle))
    table = {}
    for model, by_method in summary["models"].items():
        for method, result in by_method.items():
            for ratio in sorted(result["ratios"], key=float):
                chosen = cells_at(cells, model, method, float(ratio))
                row = {"n_synth": result["ratios"][ratio]["n_synth"], "val_f1": result["ratios"][ratio]["val_f1"],
                       "f1_sd": result["ratios"][ratio]["test_f1_sd"], "n_cells": len(chosen)}
                row.update(_intervals(run, chosen))
                if chosen and chosen[0]["diversity_metric"]:
                    row["diversity"] = float(np.nanmean([float(c["diversity"]) for c in chosen]))
                    row["diversity_metric"] = chosen[0]["diversity_metric"]
                table[f"{model}|{method}|{ratio}"] = row
    first = cells[0]
    return {
        "rare": args.rare, "k": args.k, "n_other": args.other_per_class, "seeds": seeds, "folds": args.folds,
        "ratios": ratios, "methods": args.methods,
        "n_real_rare_train": int(first["n_real_rare"]), "n_val_pos": int(first["n_val_pos"]),
        "n_val_neg": int(first["n_val_neg"]), "n_test_pos": int(first["n_test_pos"]),
        "n_test_neg": int(first["n_test_neg"]),
        "summary": summary, "table": table, "guard": _guard(run), "pools": pool_fidelity(run, args.rare, table),
        "minutes": minutes, "total_minutes": total,
        "stage_times": read_json(run / "timings.json") or {},
        "command": command, "commands": ["rareaug " + " ".join(c) for c in commands],
        "device": device_label(resolve_device(args.device)), "versions": _versions(),
        "date": datetime.date.today().isoformat(),
        "adapt": _adapted(run, args.adapt) if args.adapt else None,
        "mini_unet_sha256": hashlib.sha256(
            (MINI_FOLDER / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:16],
    }


def _adapted(run: Path, conditioning: str) -> dict:
    """Which adapted base the run used, and what it was adapted on."""
    variant, = [path.parent.name for path in (run / "adapted").glob(f"{conditioning}-*/adapted.json")]
    meta = json.loads((run / "adapted" / variant / "adapted.json").read_text())
    return {"variant": variant, "conditioning": conditioning, "base_model": meta["base_model_label"],
            "parts": meta["parts"]}


def adapted_side_by_side(adapted: dict, unadapted: dict, model: str = "resnet18") -> str:
    """Each method at the ratio validation chose, on the unadapted base and on the adapted one (same split, seeds
    and test images; each run's own validation choice), with the share of its pool judged the rare class."""
    lines = ["", f"## Against the unadapted base ({adapted['adapt']['conditioning']} adaptation, "
             f"`{adapted['adapt']['variant']}`)", "",
             "| method | base | ratio (validation's choice) | test F1 [95% CI] | test PR-AUC [95% CI] | "
             "F1 gain over 0× [95% CI] | verdict |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for method in adapted["summary"]["models"][model]:
        for name, e in (("unadapted", unadapted), ("adapted", adapted)):
            entry = e["summary"]["models"].get(model, {}).get(method)
            if not entry:
                continue
            ratio = entry["recommended_ratio"]
            row = e["table"][f"{model}|{method}|{ratio:g}"]
            gain = entry.get("gain_over_ratio_0") or {}
            span = f"{gain['diff']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]" if "diff" in gain else "—"
            verdict = gain_verdict(gain) if "diff" in gain else "—"
            lines.append(f"| {method} | {name} | {ratio:g}× | {_ci(row, 'f1')} | {_ci(row, 'pr_auc')} | {span} | "
                         f"{verdict} |")
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    """Installed versions; rareaug's own from the source when it runs from a checkout that is not installed."""
    found = package_versions(VERSIONS)
    if found["rareaug"] == "not installed":
        found["rareaug"] = f"{rareaug.__version__} (source)"
    return found


def _intervals(run: Path, cells: list[dict]) -> dict:
    """Seed (and fold) mean of each test metric with a 95% bootstrap interval over the test images."""
    found = group_intervals(RunDir(run), cells, SHOWN, patient_groups(read_split(run / "split.csv")), n_boot=1000,
                            seed=0)
    return {name: {"mean": mean, "low": low, "high": high} for name, (mean, low, high) in found.items()}


def judged_shares(labels: list[str], rare: str) -> dict:
    """The share judged `rare`, and what the rest were called (largest first)."""
    return {"judged_rare": sum(label == rare for label in labels) / max(1, len(labels)),
            "judged_as": {label: labels.count(label) / len(labels)
                          for label in sorted(set(labels), key=labels.count, reverse=True) if label != rare}}


def pool_fidelity(run: Path, rare: str, table: dict) -> dict:
    """Every kept image of every pool judged by the benchmark's ruler (`rareaug.models.mini.check`), next to
    the pool's diversity at its largest ratio and the user's own estimate (the sweep's ratio-0 models)."""
    import torch

    from rareaug.images import model_input
    from rareaug.models.mini.check import judge_images
    from rareaug.models.mini.gate import cached_judge

    judge = cached_judge()
    estimates = json.loads((run / "sweep" / "summary.json").read_text()).get("pool_estimates", {})
    found = {}
    for pool in read_pools(run / "synthetic"):
        if not pool.kept:
            continue
        images = torch.stack([model_input(pool.folder / row["file"], 32, "pad") for row in pool.kept]).add(1).div(2)
        entry = {"method": pool.method, "images": len(pool.kept), **judged_shares(judge_images(judge, images), rare)}
        rows = [(float(key.rsplit("|", 1)[1]), row) for key, row in table.items()
                if key.split("|")[1] == pool.method and "diversity" in row]
        if rows:
            ratio, row = max(rows, key=lambda item: item[0])
            entry.update(diversity=row["diversity"], diversity_metric=row["diversity_metric"], diversity_ratio=ratio)
        entry["estimate"] = {model: by[pool.variant]["judged_rare"] for model, by in estimates.items()
                             if pool.variant in by}
        found[pool.variant] = entry
    return found


def _guard(run: Path) -> dict:
    return {pool.variant: {"made": len(pool.rows), "rejected": len(pool.rejected),
                           "rule": pool.summary.get("guard_rule", "absolute"), "ratio": pool.summary.get("guard_ratio"),
                           "threshold": pool.summary.get("guard_threshold"), "stopped": pool.summary.get("stop_reason")}
            for pool in read_pools(run / "synthetic")}


def headline(e: dict, model: str = "resnet18") -> str:
    """The README's headline table: ratio 0 and, per method, only the ratio validation recommended (never a
    row the test set preferred), with the seed-aware verdict and the pool's judged share. A test checks that
    the README holds exactly this text for the committed JSON."""
    by_method = e["summary"]["models"][model]
    rows = ["| method | ratio (validation's choice) | test F1 [95% CI] | ± runs | test PR-AUC [95% CI] | "
            "F1 gain over 0× [95% CI] | verdict | pool judged " + e["rare"] + " |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = e["table"].get(f"{model}|{next(iter(by_method))}|0")
    if base:
        rows.append(f"| real only | 0× | {_ci(base, 'f1')} | {base['f1_sd']:.3f} | {_ci(base, 'pr_auc')} | — | — | — |")
    judged_of: dict = {}  # method -> (judged rare images, images) over its pools (one per fold)
    for pool in e.get("pools", {}).values():
        if "method" in pool:
            judged, images = judged_of.get(pool["method"], (0.0, 0))
            judged_of[pool["method"]] = (judged + pool["judged_rare"] * pool["images"], images + pool["images"])
    for method, entry in by_method.items():
        ratio = entry["recommended_ratio"]
        row = e["table"][f"{model}|{method}|{ratio:g}"]
        gain = entry.get("gain_over_ratio_0") or {}
        pooled = (by_method[method]["ratios"].get("0", {}).get("test_f1_at_pooled_threshold_mean"),
                  by_method[method]["ratios"].get(f"{ratio:g}", {}).get("test_f1_at_pooled_threshold_mean"))
        moved = f" ({pooled[0]:.3f} → {pooled[1]:.3f})" if None not in pooled else ""
        span = f"{gain['diff']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]{moved}" if "diff" in gain else "—"
        verdict = gain_verdict(gain) if "diff" in gain else ("no synthetic data chosen" if ratio == 0 else "—")
        judged = f"{judged_of[method][0] / judged_of[method][1]:.0%}" if judged_of.get(method, (0, 0))[1] else "—"
        rows.append(f"| {method} | {ratio:g}× | {_ci(row, 'f1')} | {row['f1_sd']:.3f} | {_ci(row, 'pr_auc')} | "
                    f"{span} | {verdict} | {judged} |")
    return "\n".join(rows)


def markdown(e: dict) -> str:
    recommended = {(model, method): r.get("recommended_ratio") for model, by in e["summary"]["models"].items()
                   for method, r in by.items()}
    gains = {(model, method): r.get("gain_over_ratio_0") for model, by in e["summary"]["models"].items()
             for method, r in by.items()}
    lines = [
        f"# Evidence: {e['rare']}, k = {e['k']} real images",
        "",
        f"Rare class **{e['rare']}** (never seen by the `rareaug-mini` base model). Training data: {e['k']} real "
        f"{e['rare']} images ({e['n_real_rare_train']} train, {e['n_val_pos']} validation) and "
        f"{e.get('n_other', N_OTHER)} real images "
        f"of each other class; test: the real Fashion-MNIST test set ({e['n_test_pos']} {e['rare']}, "
        f"{e['n_test_neg']} others). Classifier: ResNet18 from scratch at 32 px, {e['seeds']} seed(s), "
        f"{e['folds']} fold(s). Threshold and recommended ratio from validation only.",
        "",
        "Each cell: test metric averaged over seeds (and folds) at each run's validation threshold, with a 95% "
        "bootstrap interval over the test images; ± is the SD of test F1 between runs (seeds x folds). ← marks the "
        "ratio recommended on validation. Ratio 0 (no synthetic images) is the same models in every table.",
        "",
        "## Headline: validation's choices only",
        "",
        "Ratio 0 and, per method, the ratio validation recommended (never a row the test set preferred). Test F1 is "
        "the mean of each run's F1 at its own validation threshold; the gain is measured as rareaug measures it, at "
        "each seed's pooled out-of-fold threshold (the F1s it compares are in brackets). Its interval resamples runs "
        "(seeds x folds) and test images; a verdict needs at least 3 runs. The last column "
        "is the share of the method's pool images the benchmark's ruler judges to be the rare garment.",
        "",
    ]
    for model in e["summary"]["models"]:
        lines += [f"{model}:", "", headline(e, model), ""]
    for key in sorted({k.rsplit("|", 1)[0] for k in e["table"]}):
        model, method = key.split("|")
        lines += [f"## {method} ({model})", "",
                  "| ratio | synthetic | val F1 | test F1 [95% CI] | ± runs | recall [95% CI] | PR-AUC [95% CI] | "
                  "diversity |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row_key in sorted((k for k in e["table"] if k.startswith(key + "|")),
                              key=lambda k: float(k.rsplit("|", 1)[1])):
            ratio = float(row_key.rsplit("|", 1)[1])
            row = e["table"][row_key]
            mark = " ←" if recommended.get((model, method)) == ratio else ""
            diversity = f"{row['diversity']:.3f} ({row['diversity_metric']})" if "diversity" in row else "—"
            lines.append(f"| {ratio:g}×{mark} | {row['n_synth']} | {row['val_f1']:.3f} | {_ci(row, 'f1')} | "
                         f"{row['f1_sd']:.3f} | {_ci(row, 'recall')} | {_ci(row, 'pr_auc')} | {diversity} |")
        gain = gains.get((model, method)) or {}
        if "diff" in gain:
            lines += ["", f"Recommended {recommended[(model, method)]:g}×: test F1 gain over ratio 0 "
                          f"{gain['diff']:+.3f} (95% paired bootstrap over {gain_kind(gain)}: {gain['low']:+.3f} to "
                          f"{gain['high']:+.3f}): **{gain_verdict(gain)}**."]
        lines.append("")
    lines += [f"## Do the pools show a {e['rare']}?", "",
              "Every kept image of each pool judged by the benchmark's ruler (`rareaug.models.mini.check`, a CNN "
              "trained on real images of all ten classes), next to the pool's diversity at its largest ratio and "
              "the estimate a user gets without that ruler (the sweep's ratio-0 models, real data only).", "",
              f"| pool | images | judged {e['rare']} | judged as, otherwise | diversity | user's estimate |",
              "| --- | --- | --- | --- | --- | --- |"]
    for variant, p in e.get("pools", {}).items():
        others = ", ".join(f"{k} {v:.0%}" for k, v in list(p["judged_as"].items())[:3]) or "—"
        diversity = (f"{p['diversity']:.3f} ({p['diversity_metric']}, {p['diversity_ratio']:g}×)" if "diversity" in p
                     else "—")
        estimate = ", ".join(f"{v:.0%} ({m})" for m, v in p["estimate"].items()) or "—"
        lines.append(f"| {variant} | {p['images']} | {p['judged_rare']:.0%} | {others} | {diversity} | {estimate} |")
    lines += ["", "## Memorisation guard", "", "| pool | made | rejected | rule | ratio / threshold |",
              "| --- | --- | --- | --- | --- |"]
    for variant, g in e["guard"].items():
        rule = g.get("rule", "absolute")
        limit = g.get("ratio") if rule == "relative" else g["threshold"]
        limit = f"{limit:.3f}" if isinstance(limit, (int, float)) else "—"
        lines.append(f"| {variant} | {g['made']} | {g['rejected']} | {rule} | {limit}"
                     + (f" ({g['stopped']})" if g.get("stopped") else "") + " |")
    lines += ["", "## How it was made", "", f"- Command: `{e['command']}` ({e['date']}, {e['device']}, "
              f"{e['total_minutes']:.1f} minutes in all).",
              "- Stages: " + ", ".join(f"{k} {v:.1f} min" for k, v in e["minutes"].items()) + ".",
              "- Stage work recorded in the run's `timings.json` (a resumed run keeps what earlier runs did, and "
              "where): " + ", ".join(f"{k} {t['seconds'] / 60:.1f} min on {t['device']}"
                                     for k, t in e.get("stage_times", {}).items()) + ".",
              "- What it ran:", *[f"  - `{c}`" for c in e["commands"]],
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in e["versions"].items())
              + f"; rareaug-mini UNet sha256 {e['mini_unet_sha256']}.", ""]
    return "\n".join(lines)


def _ci(row: dict, name: str) -> str:
    if name not in row:
        return "—"
    m = row[name]
    return f"{m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _relative(path: Path) -> Path:
    path = Path(path).resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _no_nan(value):
    """NaN (e.g. no diversity at ratio 0) as JSON null: strict JSON readers refuse NaN."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def _plain(value):
    return float(value) if isinstance(value, (np.floating, np.integer)) else str(value)


if __name__ == "__main__":
    main()

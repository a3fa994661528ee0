"""Defect methods side by side on the shipped defect sample with masks: do CutPaste, Perlin (DRAEM-style) and
classic copies lift crack recall and F1 on held-out images?

    python bench/defect_evidence.py              # 3 folds x 1 seed, ratios 0,2,8, 150 steps a cell
    python bench/defect_evidence.py --smoke      # 1 seed, 20 steps: checks the script, measures nothing

Data: `rareaug/samples/tiles/brick` (MVTec AD layout; 56 real brick crops: 40 normal, 16 with a crack rareaug drew,
with masks: the defects are synthesized, see its LICENSE.txt). No diffusion model takes part: each defect
method pastes a crack from the rare training images (CutPaste: the mask's pixels; Perlin: a Perlin-noise
region of a rare image's texture) onto a normal training image. Classifier: ResNet18 from scratch at 64 px.
Headline rows are the ratios validation chose; a gain counts only when its interval over seeds, folds and test
images excludes 0. Writes bench/results/defects-crack.md (and .json) with the commands, versions and device.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evidence import _ci, _intervals, _relative, _versions, run_rareaug  # noqa: E402
from rareaug.device import device_label, resolve_device  # noqa: E402
from rareaug.io import atomic_write_text  # noqa: E402
from rareaug.samples import defect_root  # noqa: E402
from rareaug.sweep.curves import cells_at  # noqa: E402
from rareaug.verdicts import gain_verdict  # noqa: E402

METHODS = "cutpaste,perlin,classic"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--ratios", default="0,2,8")
    parser.add_argument("--steps", type=int, default=150, help="classifier steps per cell")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--smoke", action="store_true", help="1 seed, 20 steps, ratios 0,1: checks the script only")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "defects-crack")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--in-process", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.ratios = 1, 20, "0,1"
    tag = "defects-crack" + ("-smoke" if args.smoke else "")
    started = time.monotonic()

    # The mvtec recipe at the sample's own 64 px (the shipped recipe samples at 512 for Stable Diffusion).
    args.work.mkdir(parents=True, exist_ok=True)
    recipe = args.work / "tiles-64.yaml"
    recipe.write_text((files("rareaug.recipes") / "mvtec.yaml").read_text().replace("resolution: 512",
                                                                                    "resolution: 64"))
    run, recipe, data = (_relative(path) for path in (args.work / "run", recipe, defect_root()))  # cwd is ROOT
    common = ["--run", str(run), "--config", str(recipe), "--device", args.device]
    commands = [["inspect", "--data", str(data), "--rare", "crack", "--folds", str(args.folds),
                 "--test-fraction", "0.35", "--run", str(run), "--config", str(recipe)],
                ["sweep-ratio", *common, "--methods", args.methods, "--ratios", args.ratios, "--seeds",
                 str(args.seeds), "--steps", str(args.steps), "--model", "resnet18", "--no-pretrained",
                 "--input-size", "64"]]
    for command in commands:
        run_rareaug(command, args.in_process)

    result = collect(ROOT / run, args, commands, (time.monotonic() - started) / 60,
                     " ".join(["python", "bench/defect_evidence.py", *(sys.argv[1:] if argv is None else argv)]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / f"{tag}.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out_dir / f"{tag}.md", markdown(result))
    print(markdown(result))


def collect(run: Path, args, commands, minutes: float, command: str) -> dict:
    import csv

    summary = json.loads((run / "sweep" / "summary.json").read_text())
    with open(run / "sweep" / "metrics.csv", newline="") as handle:
        cells = list(csv.DictReader(handle))
    table = {}
    for model, by_method in summary["models"].items():
        for method, entry in by_method.items():
            for ratio, at in entry["ratios"].items():
                chosen = cells_at(cells, model, method, float(ratio))
                table[f"{model}|{method}|{ratio}"] = {"n_synth": at["n_synth"], "val_f1": at["val_f1"],
                                                      "f1_sd": at["test_f1_sd"], **_intervals(run, chosen)}
    first = cells[0]
    return {"summary": summary, "table": table, "folds": args.folds, "seeds": args.seeds, "steps": args.steps,
            "ratios": args.ratios, "methods": args.methods,
            "n_test_pos": int(first["n_test_pos"]), "n_test_neg": int(first["n_test_neg"]),
            "n_real_rare_train": int(first["n_real_rare"]), "command": command,
            "commands": ["rareaug " + " ".join(c) for c in commands], "minutes": minutes,
            "device": device_label(resolve_device(args.device)), "versions": _versions(),
            "date": datetime.date.today().isoformat()}


def markdown(e: dict) -> str:
    lines = ["# Defect methods on the shipped crack sample", "",
             f"Real brick crops with cracks rareaug drew (masks included; not real defects), {e['folds']} folds x "
             f"{e['seeds']} seeds, ResNet18 from scratch at 64 px, {e['steps']} steps per cell. Test: "
             f"{e['n_test_pos']} crack and {e['n_test_neg']} normal images, never trained on. Each row: the ratio "
             "validation chose; test metrics at each run's validation threshold with 95% bootstrap intervals over "
             "the test images; the F1 gain over ratio 0 with its interval over runs and test images.", ""]
    for model, by_method in e["summary"]["models"].items():
        lines += [f"{model}:", "", "| method | ratio (validation's choice) | test F1 [95% CI] | recall [95% CI] | "
                  "PR-AUC [95% CI] | F1 gain over 0× [95% CI] | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        base = e["table"].get(f"{model}|{next(iter(by_method))}|0")
        if base:
            lines.append(f"| real only | 0× | {_ci(base, 'f1')} | {_ci(base, 'recall')} | {_ci(base, 'pr_auc')} | — | "
                         "— |")
        for method, entry in by_method.items():
            ratio = entry["recommended_ratio"]
            row = e["table"][f"{model}|{method}|{ratio:g}"]
            gain = entry.get("gain_over_ratio_0") or {}
            span = f"{gain['diff']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]" if "diff" in gain else "—"
            verdict = gain_verdict(gain) if "diff" in gain else ("no synthetic data chosen" if ratio == 0 else "—")
            lines.append(f"| {method} | {ratio:g}× | {_ci(row, 'f1')} | {_ci(row, 'recall')} | {_ci(row, 'pr_auc')} "
                         f"| {span} | {verdict} |")
        lines.append("")
    lines += ["## Every ratio", "", "| method | ratio | synthetic | val F1 | test F1 [95% CI] | ± runs |",
              "| --- | --- | --- | --- | --- | --- |"]
    for key, row in sorted(e["table"].items(), key=lambda kv: (kv[0].split("|")[1], float(kv[0].split("|")[2]))):
        _, method, ratio = key.split("|")
        lines.append(f"| {method} | {float(ratio):g}× | {row['n_synth']} | {row['val_f1']:.3f} | {_ci(row, 'f1')} | "
                     f"{row['f1_sd']:.3f} |")
    lines += ["", "## How it was made", "", f"- Command: `{e['command']}` ({e['date']}, {e['device']}, "
              f"{e['minutes']:.1f} minutes).", "- What it ran:", *[f"  - `{c}`" for c in e["commands"]],
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in e["versions"].items()) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Language-free adaptation's premise, measured: after `rareaug adapt --conditioning language-free` on image-only
data in which pullovers sit among the common garments (no caption, no label read), does the prompt "a photo of a
pullover" draw pullovers, where the unadapted mini model draws almost none?

    python bench/adapt_zero_shot.py                                   # language-free and the domain control
    python bench/adapt_zero_shot.py --conditionings language-free --steps 300 --per-class 60   # a smoke run

It runs what a user would: a class-folder copy of `--per-class` real Fashion-MNIST training images of each of the
six garments mini's UNet was trained on plus the rare one (a seeded draw), then `rareaug adapt` on the run's
training split with each conditioning. `domain` (one prompt, "a photo", for every image) is the control: it sees
the same images, so a gain it shares is the images' doing, not the pseudo text's. Then, for the unadapted and each
adapted base, `--samples` images per prompt "a photo of a <class>" (the rare class and the six common ones) with
the sampler `generate` uses, judged by the benchmark's ruler (`rareaug.models.mini.check`). Writes
bench/results/adapt-zero-shot-<class>[-label].json and .md. Develop on pullover only: dress, coat and shirt are
kept for independent checks.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from evidence import _relative, _versions, run_rareaug  # noqa: E402
from rareaug.device import device_label, resolve_device, sampling_dtype  # noqa: E402
from rareaug.io import atomic_write_text  # noqa: E402
from rareaug.samples.fashion_mnist import (  # noqa: E402
    CLASSES,
    COMMON_CLASSES,
    RARE_CLASSES,
    load_fashion_mnist,
    seeded_subset,
    write_class_folders,
)

PROMPT = "a photo of a {class}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rare", default="pullover", choices=RARE_CLASSES)
    parser.add_argument("--per-class", type=int, default=300, help="real images of each of the seven garments")
    parser.add_argument("--conditionings", default="language-free,domain")
    parser.add_argument("--steps", type=int, default=1500, help="adapt steps")
    parser.add_argument("--rank", type=int, default=0, help="adapt --rank (0: the whole UNet; mini is small)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--captions", type=Path, default=None, help="adapt --captions (the retrieval bank's words)")
    parser.add_argument("--samples", type=int, default=64, help="images per prompt and base")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--label", default=None, help="suffix of the result files")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=None, help="run folder (default runs/adapt-zero-shot-<class>)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    tag = f"adapt-zero-shot-{args.rare}" + (f"-{args.label}" if args.label else "")
    work = args.work or ROOT / "runs" / tag
    started = time.monotonic()

    # 1. Image-only data: the six common garments and the rare one, as class folders (the split needs classes;
    #    language-free and domain conditioning never read them).
    data = work / "data"
    images, labels = load_fashion_mnist("train")
    counts = {name: args.per_class for name in (*COMMON_CLASSES, args.rare)}
    draw = seeded_subset(labels, {name: counts.get(name, 0) for name in CLASSES}, seed=1)
    write_class_folders(data, "train", draw, images, labels)
    run = _relative(work / "run")
    common = ["--config", "fashion_mnist", "--run", str(run), "--device", args.device, "--data",
              str(_relative(data)), "--rare", args.rare]
    # 2. Adapt with each conditioning.
    variants, minutes = {}, {}
    for conditioning in [c.strip() for c in args.conditionings.split(",") if c.strip()]:
        command = ["adapt", *common, "--conditioning", conditioning, "--steps", str(args.steps), "--rank",
                   str(args.rank), "--lr", str(args.lr), "--batch-size", str(args.batch_size)]
        if args.captions and conditioning == "language-free":
            command += ["--captions", str(args.captions)]
        t0 = time.monotonic()
        run_rareaug(command)
        minutes[conditioning] = round((time.monotonic() - t0) / 60, 2)
        variants[conditioning] = _newest_variant(ROOT / run, conditioning)
        print(json.dumps({"adapt": conditioning, "variant": variants[conditioning],
                          "minutes": minutes[conditioning]}), flush=True)
    # 3. Sample and judge every prompt on every base.
    device = resolve_device(args.device)
    prompts = [args.rare, *COMMON_CLASSES]
    bases = {"unadapted": "mini", **{c: f"adapted:{v}" for c, v in variants.items()}}
    table = {}
    for name, spec in bases.items():
        table[name] = judge_base(spec, ROOT / run, prompts, args, device)
        print(json.dumps({"base": name, args.rare: table[name][args.rare]}), flush=True)
    result = {
        "benchmark": "adapt_zero_shot", "rare": args.rare, "date": datetime.date.today().isoformat(),
        "device": device_label(device), "command": " ".join(["python", "bench/adapt_zero_shot.py",
                                                             *(sys.argv[1:] if argv is None else argv)]),
        "per_class": args.per_class, "steps": args.steps, "rank": args.rank, "lr": args.lr,
        "batch_size": args.batch_size, "samples": args.samples, "guidance": args.guidance,
        "sampling_steps": args.sampling_steps, "minutes_adapt": minutes,
        "minutes_total": round((time.monotonic() - started) / 60, 2), "variants": variants,
        "tokens": {c: _tokens(ROOT / run, v) for c, v in variants.items()}, "table": table,
        "versions": _versions(),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / f"{tag}.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out_dir / f"{tag}.md", markdown(result))
    print(f"wrote {args.out_dir / (tag + '.md')}", flush=True)


def judge_base(spec: str, run: Path, prompts: list[str], args, device) -> dict:
    """For each prompt: the share judged as the prompted class and the share judged the rare class, with a 95%
    Wilson interval for the first."""
    from rareaug.generate.sampler import BankSampler, SampleRequest
    from rareaug.models import load_base_model
    from rareaug.models.mini.check import judge_images
    from rareaug.models.mini.gate import cached_judge

    base = load_base_model(spec, device=device, dtype=sampling_dtype(device), run=run)
    judge = cached_judge()
    found = {}
    for cls in prompts:
        sampler = BankSampler(base, None, PROMPT.replace("{class}", cls), args.guidance, args.sampling_steps,
                              "default", device, 32)
        judged = []
        for start in range(0, args.samples, 32):
            requests = [SampleRequest([], [], [], seed) for seed in range(start, min(args.samples, start + 32))]
            judged += judge_images(judge, sampler.sample(requests))
        share = sum(label == cls for label in judged) / len(judged)
        found[cls] = {"judged_as_prompted": share, "interval": _wilson(share, len(judged)),
                      "judged_rare": sum(label == args.rare for label in judged) / len(judged),
                      "judged_as": {label: judged.count(label) / len(judged)
                                    for label in sorted(set(judged), key=judged.count, reverse=True)}}
    return found


def _wilson(share: float, n: int, z: float = 1.96) -> list[float]:
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(float(centre - half), 4), round(float(centre + half), 4)]


def _newest_variant(run: Path, conditioning: str) -> str:
    found = sorted((run / "adapted").glob(f"{conditioning}-*/adapted.json"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent.name


def _tokens(run: Path, variant: str) -> dict | None:
    path = run / "adapted" / variant / "tokens.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    done = json.loads((run / "adapted" / variant / "done.json").read_text())
    return {"tokens": record["tokens"], "alignment": record["alignment"],
            "contrastive_loss": record["contrastive_loss"], "retrieved_words": record["retrieved_words"][:10],
            "final_loss": done["final_loss"]}


def markdown(r: dict) -> str:
    rare = r["rare"]
    prompts = list(r["table"]["unadapted"])
    lines = [f"# Zero-shot {rare} after language-free adaptation ({r['date']}, {r['device']})", "",
             f"Command: `{r['command']}`", "",
             f"Adapted on the training split of {r['per_class']} real Fashion-MNIST images of each of the six common "
             f"garments and {rare} (no labels read), {r['steps']} steps, rank {r['rank']} (0: whole UNet), lr "
             f"{r['lr']:g}, batch {r['batch_size']}; {r['samples']} samples per prompt, guidance {r['guidance']:g}, "
             f"{r['sampling_steps']} steps; judged by `rareaug.models.mini.check`. Minutes: {r['minutes_adapt']} "
             f"(adapt), {r['minutes_total']} in all.", "",
             "Share judged as the prompted class (95% Wilson interval); for the other prompts, the share judged "
             f"{rare} in brackets:", "",
             "| base | " + " | ".join(f"\"{p}\"" for p in prompts) + " |",
             "|---|" + "---|" * len(prompts)]
    for name, row in r["table"].items():
        cells = []
        for p in prompts:
            entry = row[p]
            low, high = entry["interval"]
            cell = f"{entry['judged_as_prompted']:.0%} [{low:.0%}, {high:.0%}]"
            if p != rare:
                cell += f" ({entry['judged_rare']:.0%} {rare})"
            cells.append(cell)
        label = name if name == "unadapted" else f"adapted, {name} (`{r['variants'][name]}`)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name, tokens in r["tokens"].items():
        if tokens:
            words = ", ".join(f"{w} ({n})" for w, n in tokens["retrieved_words"])
            found = tokens["alignment"]
            found = found if isinstance(found, dict) else {"cosine": found}
            top1 = (f", {found['top1']:.0%} of images nearest their own pseudo prompt" if "top1" in found else "")
            lines += ["", f"{name}: {tokens['tokens']} pseudo-tokens, mean CLIP cosine of each image with its pseudo "
                      f"prompt {found['cosine']:.3f}{top1} (contrastive loss {tokens['contrastive_loss']:.3f}); words "
                      f"retrieved most often: {words}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Does the memorization guard catch copies and pass new images, on smooth images and on textures?

For each domain, the guard compares with a reference set of real images (what `generate` compares with: the
real rare training images). Altered copies of every reference image must be caught: exact copies, JPEG
re-encodes (quality 75 and 50), brightness +0.05 and x0.9, shifts of 1 and 2 pixels. Independent images of the
same kind, never in the reference set, must pass. Horizontal flips and 75% crops are reported and not scored:
by this rule they are new images.

Domains (all real images, shipped or installed with the dev dependencies):
- fashion: the 24 shipped pullovers (32 px) against Fashion-MNIST test-set pullovers (Debian's
  dataset-fashion-mnist);
- radiographs: 64 px crops of pydicom-data's CR chest radiograph (RG1: 15-bit, MONOCHROME1, decoded by rareaug,
  at a third of its size), reference and independent crops on alternating cells of a grid (flat or burnt-out
  cells left out);
- textures: the 12 shipped gravel crops (64 px) against other cells of scikit-image's gravel photograph.

    python bench/guard_calibration.py [--independent 40] [--out bench/results/guard-calibration.json]

Prints one JSON line per domain and rule as it is measured, then writes the summary.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rareaug.generate.guard import DEFAULT_RATIO, Guard  # noqa: E402

COPIES = ("exact", "jpeg75", "jpeg50", "brighter+0.05", "darker*0.9", "shift1", "shift2", "shift2-diagonal")
NEW_IMAGES = ("hflip", "crop75")
DOMAINS = ("fashion", "radiographs", "textures")
RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7)
CROP = 64


# ------------------------------------------------------------------------------------------------ the data
def domain_sets(name: str, independent: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, independent) real images of one domain, (N, 1, H, W) in [0, 1]."""
    if name == "fashion":
        return _fashion(independent)
    if name == "radiographs":
        return _radiographs(independent)
    if name == "textures":
        return _textures(independent)
    raise ValueError(f"unknown domain {name!r}; choose from {', '.join(DOMAINS)}")


def _fashion(independent: int) -> tuple[torch.Tensor, torch.Tensor]:
    from rareaug.samples import FASHION_RARE, fashion_root
    from rareaug.samples.fashion_mnist import load_fashion_mnist

    reference = _pngs(sorted((fashion_root() / FASHION_RARE).glob("*.png")))
    images, labels = load_fashion_mnist("test")  # never the shipped (training-set) images
    chosen = np.flatnonzero(labels == 2)[:independent]  # 2 = pullover
    others = torch.from_numpy(images[chosen].astype(np.float32) / 255)[:, None]
    return reference, F.pad(others, (2, 2, 2, 2))  # 28 px padded to 32 with black, as the shipped sample


def _radiographs(independent: int) -> tuple[torch.Tensor, torch.Tensor]:
    from pydicom.data import get_testdata_file

    from data_adapters.decode import decode_dicom

    cells = []
    pixels = torch.from_numpy(decode_dicom(Path(get_testdata_file("RG1_UNCI.dcm"))).pixels)[None]  # the chest
    small = F.interpolate(pixels, scale_factor=1 / 3, mode="area")[0, 0]
    for y in range(0, small.shape[0] - CROP + 1, CROP):
        for x in range(0, small.shape[1] - CROP + 1, CROP):
            crop = small[y:y + CROP, x:x + CROP]
            saturated = float(((crop < 0.02) | (crop > 0.98)).float().mean())
            if saturated < 0.05 and float(crop.std()) > 0.04:  # not collimator, blank film or burnt-out edge
                cells.append(crop[None])
    return torch.stack(cells[0::2][:24]), torch.stack(cells[1::2][:independent])


def _textures(independent: int) -> tuple[torch.Tensor, torch.Tensor]:
    from skimage import data

    from rareaug.samples import sample_root

    reference = _pngs(sorted((sample_root() / "gravel").glob("*.png")))
    photo = data.gravel().astype(np.float32) / 255
    # The shipped crops sit on every other row of 64 px cells from the top: these are the rows between them.
    cells = [(y, x) for y in range(CROP, photo.shape[0] - CROP + 1, 2 * CROP)
             for x in range(0, photo.shape[1] - CROP + 1, CROP)]
    others = torch.stack([torch.from_numpy(photo[y:y + CROP, x:x + CROP].copy())[None] for y, x in cells[:independent]])
    return reference, others


def _pngs(paths: list[Path]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255)[None]
                        for p in paths])


# ------------------------------------------------------------------------------------------- alterations
def perturbations(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Altered copies of each image (same order): those in COPIES must be caught, NEW_IMAGES are reported."""
    h, w = images.shape[-2:]
    return {"exact": images, "jpeg75": _jpeg(images, 75), "jpeg50": _jpeg(images, 50),
            "brighter+0.05": (images + 0.05).clamp(0, 1), "darker*0.9": images * 0.9,
            "shift1": _shift(images, 1, 1), "shift2": _shift(images, 2, 0), "shift2-diagonal": _shift(images, 2, 2),
            "hflip": images.flip(-1),
            "crop75": F.interpolate(images[..., h // 8:h - h // 8, w // 8:w - w // 8], size=(h, w), mode="bilinear",
                                    align_corners=False)}


def _shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Moved by (dy, dx) pixels, the uncovered edge filled by repeating the border (as a re-crop would)."""
    pad = max(abs(dy), abs(dx))
    h, w = images.shape[-2:]
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def _jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(buffer, "JPEG", quality=quality)
        out.append(torch.from_numpy(np.asarray(Image.open(buffer), dtype=np.float32) / 255)[None])
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------- judging
def evaluate(reference: torch.Tensor, independent: torch.Tensor, rule: str = "relative",
             ratio: float = DEFAULT_RATIO) -> dict:
    """Share caught per alteration, share of independent images passed, and the scores' range."""
    guard = Guard(reference, [f"r{i}" for i in range(len(reference))], rule=rule, ratio=ratio)
    result = {"rule": rule, "ratio": ratio if rule == "relative" else None, "threshold": guard.threshold,
              "reference": len(reference), "independent": len(independent), "caught": {}, "score_max": {}}
    for name, altered in perturbations(reference).items():
        judged = guard.judge(altered)
        result["caught"][name] = float(np.mean(judged.copies))
        result["score_max"][name] = float(np.max(judged.scores))
    judged = guard.judge(independent)
    result["independent_passed"] = float(1 - np.mean(judged.copies))
    result["independent_score_min"] = float(np.min(judged.scores))
    result["independent_score_p5"] = float(np.percentile(judged.scores, 5))
    result["copies_all_caught"] = all(result["caught"][name] == 1.0 for name in COPIES)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--independent", type=int, default=40, help="independent images per domain")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "guard-calibration.json")
    args = parser.parse_args(argv)
    summary = {"command": "python bench/guard_calibration.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "date": datetime.date.today().isoformat(), "device": f"cpu ({platform.machine()})",
               "copies": list(COPIES), "new_images": list(NEW_IMAGES), "domains": {}}
    for domain in DOMAINS:
        reference, independent = domain_sets(domain, args.independent)
        rows = [evaluate(reference, independent, "relative", ratio) for ratio in RATIOS]
        rows.append(evaluate(reference, independent, "absolute"))
        for row in rows:
            print(json.dumps({"domain": domain, **row}), flush=True)
        summary["domains"][domain] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()

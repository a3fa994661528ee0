"""Where the near-duplicate rule's constants come from (rareaug/near_duplicates.py): copies and distinct images of
real data at several sizes, and what the rule flags among them.

For each family of distinct real images (Fashion-MNIST test images at 28 px; non-overlapping crops of
scikit-image's photographs and textures at 28, 64 and 256 px; 256-px crops of pydicom-data's two computed
radiographs) it plants copies of 100 images under each transform (exact, JPEG q90/q75/q50, brightness x1.1 and
x1.2, +20 grey levels) in a split of their own, fits the rule on the family plus those copies, as `inspect`
does on a user's data, and counts:
- recall: the share of copies paired with their original;
- false pairs: pairs of two distinct images (spread over three splits at random), or a copy with another image;
- the hash and pixel distances the copies moved by, and the distinct images' nearest-neighbour distances.
A lossy JPEG 2000 radiograph against its lossless original (pydicom-data's RG1/RG3 *_J2KI vs *_UNCI) is a
re-encode made by a real system, checked at full size.

    .venv/bin/python bench/near_duplicates.py   # ~1 min on 2 CPU cores; writes bench/results/near_duplicates.json
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import io
import json
import platform
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_adapters import decode  # noqa: E402
from data_adapters.thumbnail import thumbnail_of  # noqa: E402
from rareaug.near_duplicates import FLAT_NORM, NearDuplicates  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")  # Debian's dataset-fashion-mnist
PHOTOS = ("camera", "astronaut", "brick", "grass", "gravel", "coffee", "chelsea", "moon", "text", "rocket", "coins",
          "page", "horse", "retina", "cell", "immunohistochemistry", "hubble_deep_field")
PLANTED = 100


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("L")


TRANSFORMS = {
    "exact": lambda im: im,
    "jpeg90": lambda im: _jpeg(im, 90),
    "jpeg75": lambda im: _jpeg(im, 75),
    "jpeg50": lambda im: _jpeg(im, 50),
    "brightness1.1": lambda im: ImageEnhance.Brightness(im).enhance(1.1),
    "brightness1.2": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
    "plus20": lambda im: Image.fromarray(np.clip(np.asarray(im, dtype=np.int16) + 20, 0, 255).astype(np.uint8)),
}


def fashion(limit: int = 3000) -> list[Image.Image]:
    raw = gzip.open(FASHION).read()
    return [Image.fromarray(a) for a in np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:limit]]


def _gray_u8(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 3:
        array = array[..., :3].mean(axis=-1)
    return (255 * (array - array.min()) / (np.ptp(array) or 1)).astype(np.uint8)


def tiles(images: list[np.ndarray], side: int, source: int, limit: int) -> list[Image.Image]:
    """Non-overlapping `source`-px crops of each image, resized to `side` px."""
    out = []
    for array in images:
        for y in range(0, array.shape[0] - source + 1, source):
            for x in range(0, array.shape[1] - source + 1, source):
                crop = Image.fromarray(array[y:y + source, x:x + source])
                out.append(crop if source == side else crop.resize((side, side), Image.Resampling.BILINEAR))
    rng = np.random.default_rng(0)
    return [out[i] for i in sorted(rng.choice(len(out), min(limit, len(out)), replace=False))]


def photos() -> list[np.ndarray]:
    import skimage.data

    return [_gray_u8(getattr(skimage.data, name)()) for name in PHOTOS]


def radiographs() -> dict[str, np.ndarray]:
    from pydicom.data import get_testdata_file

    found = {}
    for name in ("RG1_UNCI", "RG1_J2KI", "RG3_UNCI", "RG3_J2KI"):
        path = get_testdata_file(f"{name}.dcm")
        if path:
            found[name] = (decode(Path(path)).pixels.mean(axis=0) * 255 + 0.5).astype(np.uint8)
    return found


def _thumb(image: Image.Image) -> np.ndarray:
    return thumbnail_of(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)


def _phash(image: Image.Image) -> int:
    import imagehash  # the dev extra: only this measurement needs it

    return int(str(imagehash.phash(image.convert("L"))), 16)


def _flat(thumb: np.ndarray) -> bool:
    values = thumb.astype(np.float32).reshape(-1)
    return float(np.linalg.norm(values - values.mean())) < FLAT_NORM


def evaluate(name: str, images: list[Image.Image]) -> dict:
    """Blank (flat) images are left out: the rule never matches them, by design."""
    rng = np.random.default_rng(1)
    thumbs = [_thumb(im) for im in images]
    flat = sum(_flat(t) for t in thumbs)
    images = [im for im, t in zip(images, thumbs) if not _flat(t)]
    base = [t for t in thumbs if not _flat(t)]
    splits = rng.integers(0, 3, len(base))
    planted = sorted(rng.choice(len(base), min(PLANTED, len(base)), replace=False))
    alone = NearDuplicates(base)
    nearest = np.sort([_nearest(alone, i) for i in range(len(base))])
    result = {"family": name, "images": len(base), "flat_left_out": flat, "side": min(images[0].size),
              "typical_second_nearest": alone.typical,
              "threshold": alone.threshold, "distinct_nearest_pixel_min": float(nearest[0]),
              "distinct_nearest_pixel_q001": float(np.quantile(nearest, 0.001)), "transforms": {}}
    false_distinct = [(p.a, p.b) for p in alone.pairs(splits)]
    result["false_pairs_distinct"] = len(false_distinct)
    for transform, fn in TRANSFORMS.items():
        copied = [fn(images[i]) for i in planted]
        copies = [_thumb(im) for im in copied]
        index = NearDuplicates(base + copies)
        groups = np.concatenate([splits, np.full(len(copies), 3)])
        pairs = index.pairs(groups)
        original = {len(base) + k: int(i) for k, i in enumerate(planted)}
        hits = {p.b for p in pairs if p.b in original and original[p.b] == p.a}
        wrong = [p for p in pairs if not (p.b in original and original[p.b] == p.a)]
        hash_moved = [int(np.bitwise_count(np.uint64(_phash(images[i]) ^ _phash(im))))
                      for i, im in zip(planted, copied)]
        pixel_moved = [float(index.distances(np.array([i]), np.array([len(base) + k]))[0, 0])
                       for k, i in enumerate(planted)]
        result["transforms"][transform] = {
            "recall": len(hits) / len(copies), "false_pairs": len(wrong), "threshold": index.threshold,
            "hash_moved_max": max(hash_moved), "pixel_moved_max": max(pixel_moved),
            "pixel_moved_q99": float(np.quantile(pixel_moved, 0.99))}
        print(f"{name:>14} {transform:>14}: recall {len(hits) / len(copies):.2f}, false pairs {len(wrong)}, "
              f"hash moved <= {max(hash_moved)}, pixel moved <= {max(pixel_moved):.4f} "
              f"(threshold {index.threshold:.4f})", flush=True)
    hashes = np.array([_phash(im) for im in images], dtype=np.uint64)
    hash_nearest = np.sort([int(np.partition(np.bitwise_count(hashes ^ h), 1)[1]) for h in hashes])
    result["distinct_nearest_hash_min"] = int(hash_nearest[0])
    result["distinct_nearest_hash_median"] = float(np.median(hash_nearest))
    print(f"{name:>14}: {len(base)} images ({flat} flat left out), typical second-nearest {alone.typical:.4f}, "
          f"distinct nearest min {nearest[0]:.4f} (hash {hash_nearest[0]} bits, median {np.median(hash_nearest):g}), "
          f"false pairs among distinct {len(false_distinct)}", flush=True)
    return result


def _nearest(index: NearDuplicates, i: int) -> float:
    distance = index.distances(np.array([i]))[0]
    distance[i] = np.inf
    return float(distance.min())


def lossy_radiographs(found: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for stem in ("RG1", "RG3"):
        if f"{stem}_UNCI" in found and f"{stem}_J2KI" in found:
            a, b = (Image.fromarray(found[f"{stem}_{kind}"]) for kind in ("UNCI", "J2KI"))
            crops = tiles([found[f"{stem}_UNCI"]], 256, 256, 40)
            index = NearDuplicates([_thumb(a), _thumb(b), *(_thumb(im) for im in crops)])
            pairs = index.pairs([0, 1] + [2] * (index.size - 2))
            rows.append({"pair": f"{stem} lossless vs lossy JPEG 2000", "found": any({p.a, p.b} == {0, 1}
                                                                                     for p in pairs)})
            print(f"{rows[-1]['pair']}: {'found' if rows[-1]['found'] else 'MISSED'}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "near_duplicates.json")
    args = parser.parse_args()
    pictures = photos()
    xrays = radiographs()
    families = [("fashion-mnist", fashion()),
                ("photos-28px", tiles(pictures, 28, 56, 1500)),
                ("photos-64px", tiles(pictures, 64, 64, 1500)),
                ("photos-256px", tiles(pictures, 256, 256, 400)),
                ("radiograph-256px", tiles([xrays[k] for k in ("RG1_UNCI", "RG3_UNCI") if k in xrays], 256, 256, 400))]
    results = [evaluate(name, images) for name, images in families if len(images) > 10]
    record = {"command": "python bench/near_duplicates.py", "date": datetime.date.today().isoformat(),
              "machine": platform.processor() or platform.machine(), "families": results,
              "lossy_radiographs": lossy_radiographs(xrays)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""`rareaug report`: one self-contained HTML page (images and plots inlined, no network) for a run directory."""
from __future__ import annotations

import base64
import datetime
import html
import math
import random
from pathlib import Path

import yaml
from PIL import Image

from data_adapters.decode import DecodeError

from ..config import DEFECT_METHODS, UNSAMPLED_METHODS, hash_path
from ..errors import RareaugError
from ..images import model_input
from ..io import atomic_write_text
from ..run_dir import RunDir
from ..split import lora_images, split_folds
from ..verdicts import GAIN, LOSS, TOO_FEW, gain_kind, gain_verdict
from . import figures
from .gather import ReportData, gather

SYNTHETIC_SHOWN = 16
REAL_SHOWN = 8
FUSED_SHOWN = 4
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;
color:#1d2330;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #d8dce4;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #d8dce4;padding:.3em .6em;text-align:right}
th{background:#f2f4f8}td:first-child,th:first-child{text-align:left}.muted{color:#5b6475}
.good{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}.flat{color:#5b6475;font-weight:600}
figure{display:inline-block;margin:.4em 1em .8em 0;vertical-align:top}figcaption{font-size:.85em;color:#5b6475}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.8em}img{max-width:100%}
.fused{display:flex;gap:.6em;align-items:center;margin:.3em 0}\
.fused img{width:96px;height:96px;image-rendering:pixelated}
"""


def write_report(run_path: Path, real_images: bool = True) -> Path:
    """Write RUN/report.html atomically and return its path."""
    data = gather(run_path)
    page = render(data, real_images)
    path = RunDir(data.run).report_html
    atomic_write_text(path, page)
    return path


def render(data: ReportData, real_images: bool = True) -> str:
    sections = [
        _header(data, real_images),
        _recommendation(data),
        _curves(data),
        _images(data, real_images),
        _fidelity(data),
        _guard(data),
        _data(data),
        _provenance(data),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>rareaug report: {html.escape(data.rare)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(s for s in sections if s) + "</body></html>\n")


# ----------------------------------------------------------------------------------------------------- sections
def _header(data: ReportData, real_images: bool) -> str:
    note = "" if real_images else "<p class=\"muted\">Real images are left out of this report (--no-real-images).</p>"
    return (f"<h1>rareaug report: rare class <em>{html.escape(data.rare)}</em></h1>"
            f"<p class=\"muted\">Run <code>{html.escape(data.run.name)}</code>, written "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. Image ids are opaque (r… real, s… synthetic); "
            f"no patient and no data file is named here.</p>{note}")


def _recommendation(data: ReportData) -> str:
    if not data.summary:
        return "<h2>Recommendation</h2><p>No ratio sweep in this run yet: run <code>rareaug sweep-ratio</code>.</p>"
    rows, sentences = [], []
    for model, by_method in data.summary.get("models", {}).items():
        for method, result in by_method.items():
            best = result.get("recommended_ratio")
            if best is None:
                continue
            at = result["ratios"].get(f"{best:g}") or result["ratios"].get(str(best)) or {}
            base = result["ratios"].get("0", {})
            gain = result.get("gain_over_ratio_0") or {}
            rows.append(f"<tr><td>{html.escape(model)}</td><td>{html.escape(method)}</td><td>{best:g}×</td>"
                        f"<td>{_num(_pooled_f1(at))}</td><td>{_num(at.get('test_recall_mean'))}</td>"
                        f"<td>{_num(at.get('test_pr_auc_mean'))}</td><td>{_num(_pooled_f1(base))}</td>"
                        f"<td>{_gain_cell(gain)}</td></tr>")
            sentences.append(f"<li>{_verdict(model, method, best, base, at, gain)}</li>")
    if not rows:
        return "<h2>Recommendation</h2><p>The sweep recommended no ratio (see the failed cells in summary.json).</p>"
    rule = html.escape(data.summary.get("decision_rule", ""))
    skipped = data.summary.get("skipped_cells") or {}
    if skipped:
        sentences.append(f"<li>{len(skipped)} cell(s) did not run because the memorisation guard stopped their pool "
                         f"short: {html.escape(', '.join(sorted(skipped)))} (see the guard section).</li>")
    return ("<h2>Recommendation</h2><table><tr><th>model</th><th>method</th><th>ratio</th><th>test F1</th>"
            "<th>test recall</th><th>test PR-AUC</th><th>F1 at ratio 0</th><th>F1 gain [95% CI]</th></tr>"
            + "".join(rows) + "</table><ul>" + "".join(sentences) + f"</ul><p class=\"muted\">{rule}</p>")


def _verdict(model: str, method: str, best: float, base: dict, at: dict, gain: dict) -> str:
    """Plain words, no stronger than the evidence: the interval's kind and the verdict come from the sweep."""
    name = f"<b>{html.escape(method)}</b> ({html.escape(model)})"
    if best == 0:
        return (f"{name}: validation did not favour synthetic images at any ratio. With few rare validation images "
                "this is uncertain: compare the curves above before deciding." )
    if not gain or "diff" not in gain:
        return f"{name}: {best:g}× recommended on validation; its gain could not be tested."
    span = (f"{gain['diff']:+.3f}, 95% interval {gain['low']:+.3f} to {gain['high']:+.3f} over "
            f"{html.escape(gain_kind(gain))}")
    change = f"test F1 from {_num(_pooled_f1(base))} to {_num(_pooled_f1(at))} ({span})"
    verdict = gain_verdict(gain)
    caveat = " The choice of the ratio on a small validation set is not in the interval."
    if verdict.startswith(GAIN):
        return (f"{name}: adding {best:g}× synthetic images raised {change}: "
                f"<span class=\"good\">{verdict}</span>.{caveat}")
    if verdict.startswith(LOSS):
        return (f"{name}: adding {best:g}× synthetic images lowered {change}: "
                f"<span class=\"bad\">{verdict}</span>.{caveat}")
    if verdict.startswith(TOO_FEW):
        return (f"{name}: {best:g}× changed {change}: <span class=\"flat\">{verdict}</span> (at least 3 seeds x folds "
                "are needed); do not count on a gain.")
    return f"{name}: {best:g}× changed {change}: <span class=\"flat\">{verdict}</span>; do not count on a gain."


def _pooled_f1(entry: dict):
    """Test F1 at each seed's pooled-validation threshold: the figure the gain is computed on."""
    value = entry.get("test_f1_at_pooled_threshold_mean")
    return value if value is not None else entry.get("test_f1_mean")


def _curves(data: ReportData) -> str:
    if not data.metrics:
        return ""
    parts = ["<h2>Metrics against the ratio</h2><p class=\"muted\">Test metrics averaged over seeds and folds at each "
             "model's validation threshold; bands are 95% bootstrap intervals over the test images; the grey band "
             "and dashed line are ratio 0 (real images only); ★ marks the ratio recommended on validation.</p>"]
    all_curves = {}
    for model in sorted({row["model"] for row in data.metrics}):
        methods = sorted({row["method"] for row in data.metrics if row["model"] == model} - {figures.BASELINE})
        curves = {method: figures.curve_points(data, model, method) for method in methods}
        recommended = {method: ((data.summary or {}).get("models", {}).get(model, {}).get(method, {})
                                .get("recommended_ratio")) for method in methods}
        parts.append(_figure(figures.metric_curves(curves, recommended, model), f"{model}: recall, F1 and PR-AUC"))
        all_curves[model] = curves
    for model, curves in all_curves.items():
        diversity = figures.diversity_curves(curves)
        if diversity:
            parts.append(_figure(diversity, f"{model}: diversity of the synthetic images used at each ratio "
                                            "(higher = more varied)"))
    return "".join(parts)


REAL_PIXEL_METHODS = ("classic", "img2img", *DEFECT_METHODS)  # their images are made from real images' pixels


def _images(data: ReportData, real_images: bool) -> str:
    if not data.pools:
        return ""
    rng = random.Random(0)
    real_rows = lora_images(data.rows, split_folds(data.rows))  # the real images the LoRAs learned
    parts = ["<h2>Real and synthetic images</h2>"]
    if real_images and real_rows:
        shown = sorted(rng.sample(real_rows, min(REAL_SHOWN, len(real_rows))), key=lambda r: r.id)
        decoded = [(row, _real_tile(row)) for row in shown]
        decoded = [(row, tile) for row, tile in decoded if tile is not None]
        if decoded:
            parts.append(_figure(figures.image_grid([tile for _, tile in decoded], REAL_SHOWN),
                                 "real training images: " + ", ".join(row.id for row, _ in decoded)))
    for pool in data.pools:
        kept = pool.kept
        if not kept:
            continue
        parts.append(f"<h3>{html.escape(pool.variant)}</h3><p>{html.escape(_base_of(pool))}</p>")
        if pool.method in REAL_PIXEL_METHODS and not real_images:
            parts.append(f"<p class=\"muted\">{len(kept)} kept; not shown: {html.escape(pool.method)} images carry "
                         "the real images' pixels.</p>")
            continue
        tiles = [t for t in (_synthetic_tile(pool.folder / row["file"]) for row in kept[:SYNTHETIC_SHOWN]) if t]
        if tiles:
            parts.append(_figure(figures.image_grid(tiles, 8), f"{len(kept)} kept; the first {len(tiles)} of the pool"))
        if pool.method == "loft" and real_images:
            parts.append(_fused(data, pool))
        elif pool.method == "img2img":
            parts.append(_from_sources(data, pool))
        elif pool.method in DEFECT_METHODS:
            parts.append(_with_masks(pool))
    return "".join(parts)


def _from_sources(data: ReportData, pool) -> str:
    """img2img: each image beside the real image it started from, with the strength and the distance kept."""
    rows = []
    for row in pool.kept[:FUSED_SHOWN]:
        real = data.real(row.get("source_id", ""))
        source, result = (_real_tile(real) if real else None), _synthetic_tile(pool.folder / row["file"])
        if source is None or result is None:
            continue
        rows.append(f"<div class=\"fused\"><img alt=\"{html.escape(real.id)}\" "
                    f"src=\"{_data_uri(figures.image_grid([source], 1))}\"> → <img alt=\"{html.escape(row['file'])}\" "
                    f"src=\"{_data_uri(figures.image_grid([result], 1))}\"><span>{html.escape(real.id)} noised to "
                    f"strength {html.escape(row.get('strength', ''))} → {html.escape(row['file'].rsplit('.', 1)[0])}; "
                    f"distance to it {html.escape(row.get('source_distance', ''))}, to the nearest other real image "
                    f"{html.escape(row.get('nearest_real_distance', ''))}</span></div>")
    return ("<p>Image-to-image: the real image each one started from and the result.</p>" + "".join(rows)) \
        if rows else ""


def _with_masks(pool) -> str:
    """Defect methods: each image beside its defect mask."""
    rows = []
    for row in pool.kept[:FUSED_SHOWN]:
        image, mask = _synthetic_tile(pool.folder / row["file"]), _synthetic_tile(pool.folder / row.get("mask", ""))
        if image is None or mask is None:
            continue
        rows.append(f"<div class=\"fused\"><img alt=\"{html.escape(row['file'])}\" "
                    f"src=\"{_data_uri(figures.image_grid([image], 1))}\"> <img alt=\"mask\" "
                    f"src=\"{_data_uri(figures.image_grid([mask], 1))}\"><span>{html.escape(row['file'])}: "
                    f"normal image {html.escape(row.get('source_id', ''))}, defect from "
                    f"{html.escape(row.get('donor_id', ''))}, and its mask</span></div>")
    return ("<p>Defects with their masks (white = defect).</p>" + "".join(rows)) if rows else ""


def _base_of(pool) -> str:
    """Which base model made the pool (an adapted one by its variant), from its summary or manifest."""
    base = pool.summary.get("base_model") or (pool.rows[0].get("base_model") if pool.rows else "") or "none"
    if base == "none" and pool.method in DEFECT_METHODS:
        return f"base model: none ({pool.method}: defects from the real rare images on real normal images, with masks)"
    if base == "none":
        return "base model: none (classic augmentation of the real images)"
    weights = pool.rows[0].get("base_model_hash") if pool.rows else ""
    adapted = " (adapted to this run's images by `rareaug adapt`)" if base.startswith("adapted:") else ""
    return f"base model: {base}{adapted}" + (f", weights {weights}" if weights else "")


def _fused(data: ReportData, pool) -> str:
    rows = []
    for row in pool.kept[:FUSED_SHOWN]:
        sources = row.get("loras", "").split(";")
        weights = row.get("weights", "").split(";")
        real = [data.real(s) for s in sources]
        if len(sources) != 2 or any(r is None for r in real):
            continue
        tiles = [_real_tile(r) for r in real]
        if any(t is None for t in tiles):
            continue
        cells = [f"<img alt=\"{html.escape(s)}\" src=\"{_data_uri(figures.image_grid([t], 1))}\">"
                 for s, t in zip(sources, tiles)]
        result = _synthetic_tile(pool.folder / row["file"])
        if result is None:
            continue
        fused = _data_uri(figures.image_grid([result], 1))
        rows.append(f"<div class=\"fused\">{cells[0]} + {cells[1]} → <img alt=\"{html.escape(row['file'])}\" "
                    f"src=\"{fused}\"><span>{html.escape(sources[0])} (λ {html.escape(weights[0])}) + "
                    f"{html.escape(sources[1])} ({html.escape(weights[1] if len(weights) > 1 else '')}) → "
                    f"{html.escape(row['file'].rsplit('.', 1)[0])}</span></div>")
    return ("<p>LoFT fusions: the two real images whose LoRAs were fused, their weights λ, and the result.</p>"
            + "".join(rows)) if rows else ""


def _fidelity(data: ReportData) -> str:
    """How many of each pool's images a classifier of the run's real images calls the rare class."""
    estimates = (data.summary or {}).get("pool_estimates") or {}
    if not estimates:
        return ""
    parts = [f"<h2>Do the synthetic images look like {html.escape(data.rare)}? (an estimate)</h2><p class=\"muted\">"
             "Each pool's first images scored by the sweep's ratio-0 models, trained on the run's real images only, "
             "at their validation thresholds (mean over seeds and folds). It is an estimate: those classifiers' own "
             "errors on real images are in it, and an image can fool one classifier without looking right.</p>"
             "<table><tr><th>model</th><th>pool</th><th>images scored</th><th>judged rare (estimate)</th></tr>"]
    for model, pools in estimates.items():
        for variant, entry in pools.items():
            parts.append(f"<tr><td>{html.escape(model)}</td><td>{html.escape(variant)}</td><td>{entry['images']}</td>"
                         f"<td>{entry['judged_rare']:.0%}</td></tr>")
    return "".join(parts) + "</table>"


def _guard(data: ReportData) -> str:
    pools = [p for p in data.pools if p.rows]
    if not pools:
        return ""
    parts = ["<h2>Memorisation guard</h2><p class=\"muted\">Each synthetic image against its nearest real training "
             "image. Relative rule: a near-copy is closer to its nearest real image than the ratio times its mean "
             "distance to the next nearest ones; absolute rule: closer than the threshold. Near-copies were "
             "retried, then rejected.</p><table><tr><th>pool</th><th>made</th><th>kept</th><th>rejected</th>"
             "<th>rule</th><th>distance</th><th>ratio / threshold</th><th>note</th></tr>"]
    figures_html = []
    for pool in pools:
        rule = pool.summary.get("guard_rule", "absolute")  # pools made before the relative rule were absolute
        limit = pool.summary.get("guard_ratio") if rule == "relative" else pool.summary.get("guard_threshold")
        column = "guard_score" if rule == "relative" else "nearest_real_distance"
        values = [value for r in pool.rows if r.get(column) not in (None, "")
                  and math.isfinite(value := float(r[column]))]
        note = pool.summary.get("stop_reason") or ("guard off" if pool.summary.get("guard") is False else "")
        if pool.method in UNSAMPLED_METHODS:
            note = "not guarded: edits of real images by design"
        elif pool.method == "img2img":
            note = (note + "; " if note else "") + "judged against the other real images, not its source"
        parts.append(f"<tr><td>{html.escape(pool.variant)}</td><td>{len(pool.rows)}</td><td>{len(pool.kept)}</td>"
                     f"<td>{len(pool.rejected)}</td><td>{html.escape(rule)}</td>"
                     f"<td>{html.escape(str(pool.summary.get('guard_distance', '')))}</td><td>{_num(limit)}</td>"
                     f"<td>{html.escape(note)}</td></tr>")
        if values:
            figures_html.append(_figure(figures.guard_histogram(values, limit, len(pool.rejected), pool.variant, rule),
                                        pool.variant))
    return "".join(parts) + "</table>" + "".join(figures_html)


def _data(data: ReportData) -> str:
    splits = ("train", "val", "test")
    rows = "".join(f"<tr><td>{html.escape(cls)}{' (rare)' if cls == data.rare else ''}</td>"
                   + "".join(f"<td>{counts.get(s, 0)}</td>" for s in splits) + "</tr>"
                   for cls, counts in sorted(data.counts.items(), key=lambda kv: (kv[0] != data.rare, kv[0])))
    problems = {}
    for problem in data.data.get("problems", []):
        problems[problem.get("kind", "other")] = problems.get(problem.get("kind", "other"), 0) + 1
    problem_text = (", ".join(f"{n} {html.escape(k)}" for k, n in sorted(problems.items())) if problems
                    else ("none" if data.data else "inspect was not run for this run directory"))
    folds = split_folds(data.rows)
    return ("<h2>Data</h2><table><tr><th>class</th><th>train</th><th>validation</th><th>test</th></tr>" + rows
            + f"</table><p>Folds: {folds}. Problems found by inspect: {problem_text}.</p>")


def _provenance(data: ReportData) -> str:
    timing_rows = "".join(f"<tr><td>{html.escape(stage)}</td><td>{entry['seconds'] / 60:.1f}</td>"
                          f"<td>{entry.get('runs', 1)}</td><td>{html.escape(str(entry.get('device', '')))}</td></tr>"
                          for stage, entry in data.timings.items())
    timings = ("<table><tr><th>stage</th><th>minutes</th><th>runs</th><th>device</th></tr>" + timing_rows + "</table>"
               "<p class=\"muted\">sweep-ratio includes the pools it generated on demand.</p>") if timing_rows else (
        "<p>No stage times recorded.</p>")
    versions = ", ".join(f"{html.escape(k)} {html.escape(v)}" for k, v in data.versions.items())
    salt = RunDir(data.run).salt
    configs = "".join(f"<details><summary>{html.escape(name)}</summary>"
                      f"<pre>{html.escape(_without_paths(text, salt))}</pre>"
                      "</details>" for name, text in data.stages.items())
    return (f"<h2>How this run was made</h2>{timings}<p>Versions: {versions}.</p>"
            f"<p>Resolved configuration of each stage (a local path appears as its last part and a hash):</p>{configs}")


def _without_paths(text: str, salt: str) -> str:
    """Stage configs hash the data paths already; model and weight paths are shortened here too."""
    try:
        content = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return "(unreadable stage config)"
    for section, key in (("fit", "base_model"), ("generate", "base_model"), ("sweep", "weights"),
                         ("sweep", "clip_model"), ("adapt", "base_model"), ("adapt", "clip_model")):
        value = (content.get(section) or {}).get(key)
        if isinstance(value, str) and ("/" in value or "\\" in value) and (value.startswith((".", "~", "/")) or
                                                                           value.count("/") > 1):
            content[section][key] = f"{Path(value).name} (path {hash_path(value, salt)})"
    return yaml.safe_dump(content, sort_keys=False)


# ----------------------------------------------------------------------------------------------------- helpers
def _real_tile(row) -> Image.Image | None:
    try:
        pixels = model_input(row.abs_path, 128, "center", "center")
    except (OSError, RareaugError, DecodeError, ValueError):  # moved or unreadable since the split: leave it out
        return None
    array = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype("uint8")
    return Image.fromarray(array)


def _synthetic_tile(path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError):  # deleted or damaged since generate: leave it out rather than fail the page
        return None


def _figure(png: bytes, caption: str) -> str:
    return (f"<figure><img alt=\"{html.escape(caption)}\" src=\"{_data_uri(png)}\">"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _num(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "—"


def _gain_cell(gain: dict) -> str:
    if not gain or "diff" not in gain:
        return "—"
    verdict = gain_verdict(gain)
    css = "good" if verdict.startswith(GAIN) else ("bad" if verdict.startswith(LOSS) else "flat")
    return f"<span class=\"{css}\">{gain['diff']:+.3f}</span> [{gain['low']:+.3f}, {gain['high']:+.3f}]"

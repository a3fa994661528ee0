"""Rare-vs-rest metrics for the ratio sweep: a threshold picked on validation, point metrics, bootstrap intervals.

Every point metric comes from scikit-learn so the numbers match what a reader recomputes from the saved scores;
the bootstrap's per-resample scoring is vectorised by hand and tested against scikit-learn on each resample.
Intervals resample whole patients when groups are known, because images of one patient are not independent
and an image bootstrap would then make a ratio's gain look more certain than it is.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from ..errors import RareaugError

METRICS = ("recall", "precision", "f1", "pr_auc", "auroc", "sens_at_95spec")
RULES = ("max_f1", "sensitivity")
FALLBACK_THRESHOLD = 0.5  # no positive in validation: nothing to tune on, so the natural probability cut-off
MAX_FPR = 0.05  # specificity >= 0.95
_TIE = 1e-12  # F1 values this close are a tie; floating noise must not decide the threshold

# In a resample these are undefined without a positive (recall, F1, AP) or without both classes (ROC-based).
_NEEDS_POS = {"recall", "f1", "pr_auc", "auroc", "sens_at_95spec"}
_NEEDS_NEG = {"auroc", "sens_at_95spec"}


def _arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Labels as 0/1 ints and scores as floats, refusing what would make a metric silently wrong."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1 or s.ndim != 1 or len(y) != len(s):
        raise RareaugError(f"labels and scores must be 1-D and equally long (got shapes {y.shape} and {s.shape})")
    if len(y) == 0:
        raise RareaugError("no images to score: labels and scores are empty")
    if not np.isin(y, (0, 1)).all():
        raise RareaugError("labels must be 0 (rest) or 1 (rare); fix the label column")
    if not np.isfinite(s).all():
        raise RareaugError("scores contain NaN or infinity; fix the classifier output before computing metrics")
    return y.astype(int), s


def choose_threshold(labels, scores, rule: str = "max_f1", target_sensitivity: float | None = None) -> float:
    """Pick the decision threshold from validation data only, so test metrics stay unbiased.

    Args:
        labels: Validation labels, 1 = rare.
        scores: Validation scores; an image is called rare when its score >= the threshold.
        rule: "max_f1" (the score threshold maximising F1; ties go to the higher, more conservative one) or
            "sensitivity" (the highest threshold whose validation recall is >= target_sensitivity).
        target_sensitivity: Required for rule="sensitivity", in (0, 1].

    Returns:
        The threshold, one of the validation scores; 0.5 when validation has no positive.
    """
    if rule not in RULES:
        raise RareaugError(f"unknown threshold rule {rule!r}; use one of {', '.join(RULES)}")
    if rule == "sensitivity" and (target_sensitivity is None or not 0 < target_sensitivity <= 1):
        raise RareaugError(f"rule='sensitivity' needs target_sensitivity in (0, 1], got {target_sensitivity!r}")
    y, s = _arrays(labels, scores)
    if not y.any():
        return FALLBACK_THRESHOLD
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The curve's last point (precision 1, recall 0) has no threshold; thresholds ascend.
    precision, recall = precision[:-1], recall[:-1]
    if rule == "sensitivity":
        ok = recall >= target_sensitivity - _TIE
        return float(thresholds[ok].max())  # the lowest score always reaches recall 1, so ok is never empty
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(thresholds[f1 >= f1.max() - _TIE].max())


def _compute(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    """All METRICS on one set of images; AP/ROC ones are NaN when a class is missing (sklearn cannot define them)."""
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero_division=0 is the documented convention; no need to warn
        p, r, f, _ = precision_recall_fscore_support(y, (s >= threshold).astype(int), average="binary",
                                                     pos_label=1, zero_division=0, labels=[0, 1])
    out.update(recall=float(r), precision=float(p), f1=float(f))
    out["pr_auc"] = float(average_precision_score(y, s)) if y.any() else float("nan")
    out["auroc"], out["sens_at_95spec"] = _roc_metrics(y, s)
    if y.any() and (y == 0).any():
        out["auroc"] = float(roc_auc_score(y, s))  # the reference call; _roc_metrics' auc is the same number
    return {k: out[k] for k in METRICS}


def _roc_metrics(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """AUROC and sensitivity at specificity >= 0.95 from one roc_curve; NaN unless both classes are present."""
    if not (y.any() and (y == 0).any()):
        return float("nan"), float("nan")
    # drop_intermediate=False keeps every operating point, so the fpr <= 0.05 cut is exact.
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(auc(fpr, tpr)), float(tpr[fpr <= MAX_FPR + _TIE].max())  # auc(roc) is what roc_auc_score does


def binary_metrics(labels, scores, threshold: float) -> dict[str, float | int]:
    """Rare-vs-rest metrics at one threshold plus threshold-free ranking metrics.

    Args:
        labels: 1 = rare, 0 = rest.
        scores: Classifier scores; predictions are scores >= threshold.
        threshold: Usually from choose_threshold on validation; call with 0.5 for the untuned view.

    Returns:
        recall, precision, f1 (zero_division=0), pr_auc (average precision; NaN without a positive),
        auroc and sens_at_95spec (NaN unless both classes are present), n_pos, n_neg.
    """
    y, s = _arrays(labels, scores)
    out: dict[str, float | int] = dict(_compute(y, s, float(threshold)))
    out["n_pos"] = int(y.sum())
    out["n_neg"] = int(len(y) - y.sum())
    return out


def _group_ids(groups, n: int) -> np.ndarray:
    """Integer cluster ids; an image without a group (None or "") is its own cluster, never pooled."""
    if groups is None:
        return np.arange(n)
    g = list(groups)
    if len(g) != n:
        raise RareaugError(f"groups has {len(g)} entries but there are {n} images")
    missing = [v is None or v == "" or (isinstance(v, float) and np.isnan(v)) for v in g]  # NaN: pandas' blank
    keys = [("img", i) if m else ("grp", str(v)) for i, (v, m) in enumerate(zip(g, missing))]
    index: dict = {}
    return np.array([index.setdefault(k, len(index)) for k in keys])


def resample_indices(groups, n: int, n_boot: int, seed: int):
    """Yield index arrays for each bootstrap resample: images, or whole groups when groups are given."""
    gid = _group_ids(groups, n)
    n_groups = int(gid.max()) + 1
    rng = np.random.default_rng(seed)
    everyone = np.arange(n)
    for _ in range(n_boot):
        # Drawing group counts then repeating members copies each drawn group whole, with no Python loop
        # over groups; for ungrouped data this is the ordinary image bootstrap.
        counts = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        yield np.repeat(everyone, counts[gid])


def _chunks(resamples, n: int):
    """Group resamples so one vectorised pass scores many at once while the count matrices stay ~1M cells."""
    size = max(1, 1_000_000 // max(n, 1))
    chunk: list[np.ndarray] = []
    for idx in resamples:
        chunk.append(idx)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (the caller blanks what is undefined)."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _draws(y: np.ndarray, s: np.ndarray, threshold: float, chunk: list[np.ndarray],
           names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named metrics on each resample of a chunk, NaN where a resample cannot define them.

    Written by hand because scikit-learn scores one resample per call: its input checks and curve set-up
    cost ~5 s per sweep cell at 1,000 resamples, most of a CPU sweep's time. A resample is a vector of
    counts over the images, so every metric is a sum of counts: sorting the scores once gives the
    cumulative true and false positives at each distinct score (sklearn's operating points, ties as one)
    for all resamples at once. Tests hold every value to sklearn's on each resample (within 1e-12).
    """
    k, n = len(chunk), len(y)
    counts = np.stack([np.bincount(idx, minlength=n) for idx in chunk]).astype(float)  # (k, n)
    called = s >= threshold
    true_pos = counts @ (y * called).astype(float)
    n_pred = counts @ called.astype(float)
    n_pos = counts @ y.astype(float)
    n_neg = counts.sum(axis=1) - n_pos
    out: dict[str, np.ndarray] = {"recall": _ratio(true_pos, n_pos), "precision": _ratio(true_pos, n_pred),
                                  "f1": _ratio(2 * true_pos, n_pred + n_pos)}  # 2PR/(P+R) = 2TP/(called + rare)
    if {"pr_auc", "auroc", "sens_at_95spec"} & set(names):
        order = np.argsort(-s, kind="stable")
        last_of_tie = np.r_[s[order][1:] != s[order][:-1], True]
        weighted = counts[:, order]
        tp = np.cumsum(weighted * y[order], axis=1)[:, last_of_tie]  # (k, distinct scores), threshold descending
        fp = np.cumsum(weighted * (1 - y[order]), axis=1)[:, last_of_tie]
        recall = _ratio(tp, n_pos[:, None])
        step = np.diff(recall, axis=1, prepend=0.0)
        out["pr_auc"] = (step * _ratio(tp, tp + fp)).sum(axis=1)  # sklearn's AP: sum of recall steps x precision
        tpr = np.concatenate([np.zeros((k, 1)), recall], axis=1)  # roc_curve starts at (0, 0)
        fpr = np.concatenate([np.zeros((k, 1)), _ratio(fp, n_neg[:, None])], axis=1)
        out["auroc"] = (np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2).sum(axis=1)  # trapezoids, as auc
        out["sens_at_95spec"] = np.where(fpr <= MAX_FPR + _TIE, tpr, 0.0).max(axis=1)

    result = {}
    for name in names:
        v = out[name].copy()
        undefined = np.zeros(k, dtype=bool)
        if name in _NEEDS_POS:
            undefined |= n_pos == 0
        if name in _NEEDS_NEG:
            undefined |= n_neg == 0
        if name == "precision":
            undefined |= n_pred == 0  # nothing called rare: precision is undefined, not 0
        v[undefined] = np.nan
        result[name] = v
    return result


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _check_boot(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise RareaugError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < level < 1:
        raise RareaugError(f"level must be in (0, 1), got {level}")


def bootstrap_intervals(labels, scores, threshold: float, groups=None, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals, so a sweep reports how much a test metric could move by chance.

    Args:
        labels: Test labels, 1 = rare.
        scores: Test scores.
        threshold: The fixed validation threshold; it is not re-tuned per resample.
        groups: Optional cluster per image (e.g. patient hash); whole clusters are resampled. None or ""
            makes an image its own cluster.
        n_boot: Number of resamples.
        seed: Seed for numpy's default_rng; the same seed gives the same intervals.
        level: Coverage of the interval.

    Returns:
        metric -> (low, high) for recall, precision, f1, pr_auc, auroc, sens_at_95spec. Resamples where a
        metric is undefined (no positive, no negative, nothing predicted rare for precision) are skipped;
        (nan, nan) if none defines it.
    """
    _check_boot(n_boot, level)
    y, s = _arrays(labels, scores)
    threshold = float(threshold)
    parts = [_draws(y, s, threshold, chunk, METRICS)
             for chunk in _chunks(resample_indices(groups, len(y), n_boot, seed), len(y))]
    return {k: _percentiles(np.concatenate([p[k] for p in parts]), level) for k in METRICS}


def two_level_interval(before: np.ndarray, after: np.ndarray, labels: np.ndarray, groups: list, n_boot: int,
                       seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean_f1(after) - mean_f1(before) when runs (rows, paired between the two
    sides) and test images (columns, by group) are both resampled with replacement."""
    rng = np.random.default_rng(seed + 1)
    n_runs = before.shape[0]
    differences = []
    for index in resample_indices(groups, len(labels), n_boot, seed):
        picked = rng.integers(0, n_runs, n_runs)
        differences.append(mean_f1(after[picked][:, index], labels[index])
                           - mean_f1(before[picked][:, index], labels[index]))
    low, high = np.nanpercentile(differences, [2.5, 97.5])
    return float(low), float(high)


def mean_f1(decisions: np.ndarray, labels: np.ndarray) -> float:
    """Mean over rows of F1 (zero_division = 0, as sklearn's f1_score). By hand, vectorised: it runs for
    every bootstrap resample and every model, where a call into sklearn per pair would take minutes."""
    tp = (decisions & labels).sum(axis=1)
    fp = (decisions & ~labels).sum(axis=1)
    fn = (~decisions & labels).sum(axis=1)
    denominator = 2 * tp + fp + fn
    return float(np.mean(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)))


def seed_mean_intervals(labels, runs: Sequence[tuple[Sequence[float], float]], metrics: Sequence[str] = METRICS,
                        groups=None, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple]:
    """A metric averaged over several runs (seeds) on one test set, with a bootstrap interval for that average.

    Each resample of the test images is shared by every run, so the interval is the test-sampling
    uncertainty of the seed mean; the spread between seeds is reported separately (mean_sd).

    Args:
        labels: Test labels, 1 = rare.
        runs: (scores, threshold) per run, all on the same test images in the same order.
        metrics: Names from METRICS.
        groups, n_boot, seed, level: as in bootstrap_intervals.

    Returns:
        metric -> (mean over runs on all images, low, high).
    """
    _check_boot(n_boot, level)
    if not runs:
        raise RareaugError("no runs to average")
    y, _ = _arrays(labels, runs[0][0])
    arrays = [(_arrays(labels, scores)[1], float(threshold)) for scores, threshold in runs]
    point = {name: float(np.nanmean([_compute(y, s, t)[name] for s, t in arrays])) for name in metrics}
    draws: dict[str, list[np.ndarray]] = {name: [] for name in metrics}
    for chunk in _chunks(resample_indices(groups, len(y), n_boot, seed), len(y)):
        per_run = [_draws(y, s, t, chunk, metrics) for s, t in arrays]
        for name in metrics:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an all-NaN column is skipped by _percentiles
                draws[name].append(np.nanmean(np.stack([run[name] for run in per_run]), axis=0))
    return {name: (point[name], *_percentiles(np.concatenate(draws[name]), level)) for name in metrics}


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample SD over seeds or folds, ignoring NaN runs (e.g. a fold whose test had no positive).

    Returns:
        (mean, sd) with ddof=1; sd is 0 for a single value; (nan, nan) when nothing is left.
    """
    v = np.asarray(list(values), dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0

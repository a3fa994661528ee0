"""Sweep metrics agree with scikit-learn, thresholds come only from validation, and intervals behave."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

from rareaug.errors import RareaugError
from rareaug.sweep.metrics import (
    METRICS,
    _compute,
    _draws,
    binary_metrics,
    bootstrap_intervals,
    choose_threshold,
    mean_f1,
    mean_sd,
    resample_indices,
    two_level_interval,
)


def _scored(n: int, seed: int, prevalence: float = 0.2, signal: float = 0.35):
    """Labels and scores where rare images score higher on average, so every metric is informative."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    s = np.clip(signal * y + rng.random(n) * 0.7, 0, 1)
    return y, s


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_binary_metrics_equal_sklearn(threshold):
    y, s = _scored(300, seed=1)
    m = binary_metrics(y, s, threshold)
    pred = (s >= threshold).astype(int)
    assert m["recall"] == pytest.approx(recall_score(y, pred, zero_division=0), abs=1e-12)
    assert m["precision"] == pytest.approx(precision_score(y, pred, zero_division=0), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, pred, zero_division=0), abs=1e-12)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert (m["n_pos"], m["n_neg"]) == (int(y.sum()), int((y == 0).sum()))


def test_metrics_at_half_is_binary_metrics_at_half():
    y, s = _scored(100, seed=2)
    pred = (s >= 0.5).astype(int)
    assert binary_metrics(y, s, 0.5)["f1"] == pytest.approx(f1_score(y, pred))


def test_sens_at_95spec_hand_computed():
    # 20 negatives: 18 low, one at 0.5, one at 0.95. Specificity >= 0.95 allows one false positive (the 0.95
    # one) but not the 0.5 one, so the best cut sits just above 0.5: positives above it are 6 of 10.
    neg = [i / 100 for i in range(18)] + [0.5, 0.95]
    pos = [0.99, 0.96, 0.9, 0.8, 0.6, 0.55, 0.45, 0.4, 0.3, 0.2]
    y = np.array([0] * len(neg) + [1] * len(pos))
    s = np.array(neg + pos)
    assert binary_metrics(y, s, 0.5)["sens_at_95spec"] == pytest.approx(0.6)
    # A second high negative uses up the allowance below 0.95: only the 0.99 and 0.96 positives remain.
    neg2 = neg[:-2] + [0.5, 0.95, 0.92]
    y2 = np.array([0] * len(neg2) + [1] * len(pos))
    s2 = np.array(neg2 + pos)  # 21 negatives: 1/21 <= 0.05 but 2/21 is not
    assert binary_metrics(y2, s2, 0.5)["sens_at_95spec"] == pytest.approx(0.2)


def test_one_class_gives_nan_for_ranking_metrics():
    m = binary_metrics([0, 0, 0], [0.1, 0.7, 0.3], 0.5)
    assert math.isnan(m["auroc"]) and math.isnan(m["sens_at_95spec"]) and math.isnan(m["pr_auc"])
    assert (m["recall"], m["n_pos"], m["n_neg"]) == (0.0, 0, 3)


def test_choose_threshold_max_f1_known_example():
    # Thresholds 0.1 / 0.35 / 0.4 / 0.8 give F1 0.667 / 0.8 / 0.5 / 0.667.
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.35


def test_choose_threshold_ties_go_to_higher_threshold():
    # Ascending labels 1, 0, 0, 1: cutting at 0.1 (P 1/2, R 1) and at 0.9 (P 1, R 1/2) both give F1 2/3.
    assert choose_threshold([1, 0, 0, 1], [0.1, 0.2, 0.3, 0.9]) == 0.9


def test_choose_threshold_is_the_grid_max_of_sklearn_f1():
    y, s = _scored(200, seed=3)
    t = choose_threshold(y, s)
    best = max(f1_score(y, (s >= c).astype(int)) for c in np.unique(s))
    assert f1_score(y, (s >= t).astype(int)) == pytest.approx(best)


def test_choose_threshold_without_positive_is_half():
    assert choose_threshold([0, 0, 0], [0.2, 0.9, 0.4]) == 0.5


def test_choose_threshold_sensitivity_rule():
    y = [1, 1, 1, 1, 0, 0]
    s = [0.9, 0.8, 0.6, 0.3, 0.7, 0.1]
    assert choose_threshold(y, s, rule="sensitivity", target_sensitivity=0.75) == 0.6
    assert choose_threshold(y, s, rule="sensitivity", target_sensitivity=1.0) == 0.3
    assert choose_threshold(y, s, rule="sensitivity", target_sensitivity=0.5) == 0.8
    with pytest.raises(RareaugError):
        choose_threshold(y, s, rule="sensitivity")
    with pytest.raises(RareaugError):
        choose_threshold(y, s, rule="youden")


def test_choose_threshold_is_pure():
    """Only the validation arrays matter: shuffling test data, or re-ordering validation pairs, changes nothing."""
    rng = np.random.default_rng(4)
    for trial in range(20):
        y_val, s_val = _scored(150, seed=100 + trial)
        y_test, s_test = _scored(150, seed=200 + trial)
        before = (y_val.copy(), s_val.copy())
        t = choose_threshold(y_val, s_val)
        rng.shuffle(s_test)
        rng.shuffle(y_test)
        assert choose_threshold(y_val, s_val) == t
        order = rng.permutation(len(y_val))
        assert choose_threshold(y_val[order], s_val[order]) == t
        np.testing.assert_array_equal(before[0], y_val)  # its inputs are not modified either
        np.testing.assert_array_equal(before[1], s_val)


@pytest.mark.parametrize("ties", [False, True])
def test_bootstrap_draws_equal_metrics_on_each_resample(ties):
    """The vectorised resample scoring (count matrices, one sort) matches sklearn's metrics per resample,
    tied scores included, and is undefined (NaN) exactly where the metric is."""
    y, s = _scored(60, seed=5)
    if ties:
        s = np.round(s, 1)  # many images share a score: one operating point each, as in sklearn's curves
    groups = [f"p{i % 17}" for i in range(60)]
    negatives, positives = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    chunk = list(resample_indices(groups, 60, 25, seed=1)) + [
        np.array([0, 1, 2]), np.array([7, 7]), negatives[:5], positives[:4], np.array([positives[0]] * 3)]
    for threshold in (0.5, -1.0, 2.0, float(np.median(s))):
        draws = _draws(y, s, threshold, chunk, METRICS)
        for j, idx in enumerate(chunk):
            ref = _compute(y[idx], s[idx], threshold)
            undefined = {"precision"} if not (s[idx] >= threshold).any() else set()  # nothing called rare
            if not y[idx].any():  # no rare image: a rate over rare images is undefined, not 0
                undefined |= {"recall", "f1", "pr_auc", "auroc", "sens_at_95spec"}
            for k in METRICS:
                if math.isnan(ref[k]) or k in undefined:
                    assert math.isnan(draws[k][j]), (k, j, threshold)
                else:
                    assert draws[k][j] == pytest.approx(ref[k], abs=1e-12), (k, j, threshold)


def test_intervals_contain_estimate_and_narrow_with_more_data():
    widths = {}
    for n in (200, 3000):
        y, s = _scored(n, seed=6)
        point = binary_metrics(y, s, 0.5)
        ci = bootstrap_intervals(y, s, 0.5, n_boot=200, seed=0)
        assert set(ci) == set(METRICS)
        for k, (low, high) in ci.items():
            assert low <= point[k] <= high, (n, k, low, point[k], high)
        widths[n] = {k: high - low for k, (low, high) in ci.items()}
    for k in METRICS:
        assert widths[3000][k] < widths[200][k], k


def test_bootstrap_is_deterministic_by_seed():
    y, s = _scored(200, seed=7)
    assert bootstrap_intervals(y, s, 0.5, n_boot=100, seed=3) == bootstrap_intervals(y, s, 0.5, n_boot=100, seed=3)
    assert bootstrap_intervals(y, s, 0.5, n_boot=100, seed=3) != bootstrap_intervals(y, s, 0.5, n_boot=100, seed=4)


def test_two_groups_give_wider_intervals_than_images():
    # Two patients whose images differ in difficulty: resampling patients sees that, resampling images cannot.
    y1, s1 = _scored(400, seed=8, signal=0.6)
    y2, s2 = _scored(400, seed=9, signal=0.1)
    y, s = np.concatenate([y1, y2]), np.concatenate([s1, s2])
    groups = ["a"] * 400 + ["b"] * 400
    by_image = bootstrap_intervals(y, s, 0.5, n_boot=200)
    by_group = bootstrap_intervals(y, s, 0.5, groups=groups, n_boot=200)
    for k in METRICS:
        assert by_group[k][1] - by_group[k][0] > by_image[k][1] - by_image[k][0], k


def test_blank_groups_are_their_own_group():
    y, s = _scored(200, seed=10)
    blank = bootstrap_intervals(y, s, 0.5, groups=[""] * 100 + [None] * 100, n_boot=100, seed=2)
    assert blank == bootstrap_intervals(y, s, 0.5, n_boot=100, seed=2)


def test_resamples_without_a_positive_are_skipped():
    # One positive, scored highest: wherever it is drawn recall and AUROC are 1. About a third of resamples miss
    # it; counted as recall 0 (zero_division) they would drag the interval down to 0.
    y = np.array([0] * 29 + [1])
    s = np.linspace(0, 1, 30)
    ci = bootstrap_intervals(y, s, 0.5, n_boot=200)
    assert ci["recall"] == (1.0, 1.0) and ci["auroc"] == pytest.approx((1.0, 1.0))
    none = bootstrap_intervals(np.zeros(30, int), s, 0.5, n_boot=50)
    assert all(math.isnan(v) for v in none["recall"] + none["auroc"])


def test_two_level_difference_of_identical_decisions_is_exactly_zero():
    y, s = _scored(300, seed=11)
    decisions = np.stack([s >= t for t in (0.4, 0.5, 0.6)])
    low, high = two_level_interval(decisions, decisions.copy(), y.astype(bool), None, n_boot=100)
    assert (low, high) == (0.0, 0.0)


def test_a_clearly_better_classifier_is_distinguishable_by_images_and_by_patients():
    rng = np.random.default_rng(12)
    y = rng.random(500) < 0.2
    random_runs = np.stack([rng.random(500) >= 0.5 for _ in range(3)])
    good_runs = np.stack([np.clip(0.6 * y + rng.random(500) * 0.5, 0, 1) >= 0.5 for _ in range(3)])
    diff = mean_f1(good_runs, y) - mean_f1(random_runs, y)
    low, high = two_level_interval(random_runs, good_runs, y, None, n_boot=300)
    assert diff > 0 and 0 < low <= diff <= high
    groups = [f"p{i // 5}" for i in range(500)]
    assert two_level_interval(random_runs, good_runs, y, groups, n_boot=300)[0] > 0
    # Swapped roles: the difference is negative and just as distinguishable.
    assert two_level_interval(good_runs, random_runs, y, None, n_boot=300)[1] < 0


def test_two_level_resamples_pair_the_runs_and_the_images():
    # The same decisions on both sides up to which run is which would differ if runs were drawn apart.
    y, s = _scored(300, seed=13)
    runs = np.stack([s >= t for t in (0.3, 0.5, 0.7)])
    assert two_level_interval(runs, runs[[0, 1, 2]], y.astype(bool), None, n_boot=200) == (0.0, 0.0)
    low, high = two_level_interval(runs, runs[[2, 1, 0]], y.astype(bool), None, n_boot=200)
    assert low < 0 < high  # paired draws of different runs: a spread, not a fixed zero


def test_mean_f1_equals_sklearn():
    import numpy as np
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    labels = rng.random(50) < 0.2
    decisions = rng.random((3, 50)) < 0.3
    expected = np.mean([f1_score(labels, row, zero_division=0) for row in decisions])
    assert mean_f1(decisions, labels) == pytest.approx(expected)
    assert mean_f1(np.zeros((1, 5), bool), np.zeros(5, bool)) == 0.0


def test_bad_input_is_refused():
    with pytest.raises(RareaugError):
        binary_metrics([0, 1, 2], [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(RareaugError):
        binary_metrics([0, 1], [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(RareaugError):
        bootstrap_intervals([0, 1], [0.1, float("nan")], 0.5)
    with pytest.raises(RareaugError):
        bootstrap_intervals([0, 1, 1], [0.1, 0.2, 0.3], 0.5, groups=["a", "b"])


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0, float("nan")]) == (2.0, 1.0)
    assert mean_sd([0.7]) == (0.7, 0.0)
    mean, sd = mean_sd([float("nan")])
    assert math.isnan(mean) and math.isnan(sd)


def test_seed_mean_interval_of_one_run_is_the_single_run_interval():
    from rareaug.sweep.metrics import seed_mean_intervals

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    s = rng.random(400) + 0.4 * y
    single = bootstrap_intervals(y, s, 0.7, n_boot=200, seed=5)
    mean = seed_mean_intervals(y, [(s, 0.7)], ("f1", "recall", "pr_auc"), n_boot=200, seed=5)
    for name in ("f1", "recall", "pr_auc"):
        assert mean[name][0] == pytest.approx(binary_metrics(y, s, 0.7)[name])
        assert mean[name][1:] == pytest.approx(single[name])
    # Two runs: the point is the mean of the two runs' metrics, inside its own interval.
    s2 = rng.random(400) + 0.2 * y
    two = seed_mean_intervals(y, [(s, 0.7), (s2, 0.6)], ("f1",), n_boot=200, seed=5)
    expected = (binary_metrics(y, s, 0.7)["f1"] + binary_metrics(y, s2, 0.6)["f1"]) / 2
    assert two["f1"][0] == pytest.approx(expected) and two["f1"][1] <= expected <= two["f1"][2]

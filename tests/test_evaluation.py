"""Metric computations against hand-computed cases: detection curve/recall/AUC, LDS Spearman, bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from influencelab.evaluation import detection_curve, detection_metrics, paired_difference, recall_at
from influencelab.stages.lds import lds_per_query, subset_masks, summarize


def test_detection_curve_hand_computed():
    # 5 points, flipped = {1, 3}; ranking by score: 3 (0.9), 0 (0.8), 1 (0.5), 4 (0.2), 2 (0.1)
    scores = np.array([0.8, 0.5, 0.1, 0.9, 0.2])
    flipped = np.array([0, 1, 0, 1, 0], dtype=bool)
    frac, rec = detection_curve(scores, flipped)
    np.testing.assert_allclose(frac, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(rec, [0, 0.5, 0.5, 1.0, 1.0, 1.0])
    assert recall_at(scores, flipped, 0.2) == 0.5 and recall_at(scores, flipped, 0.6) == 1.0
    m = detection_metrics(scores, flipped, "x")
    # trapezoid area: 0.2*(0+.5)/2 + 0.2*.5 + 0.2*(.5+1)/2 + 0.4*1 = 0.05 + 0.1 + 0.15 + 0.4
    assert m["x/curve_auc"] == pytest.approx(0.7)
    # ROC AUC: positives {0.9, 0.5} vs negatives {0.8, 0.2, 0.1}: pairs won 3 + 2 = 5 of 6
    assert m["x/roc_auc"] == pytest.approx(5 / 6)
    # AP: precision at the hits: rank1 1/1, rank3 2/3 -> mean 5/6
    assert m["x/ap"] == pytest.approx(5 / 6)
    assert m["x/recall@10"] == 0.5  # ceil(0.1 * 5) = 1 point inspected


def test_perfect_and_random_rankings():
    rng = np.random.default_rng(0)
    flipped = np.zeros(1000, dtype=bool)
    flipped[:100] = True
    perfect = detection_metrics(flipped.astype(float) + rng.random(1000) * 0.1, flipped, "p")
    assert perfect["p/recall@10"] == 1.0 and perfect["p/roc_auc"] == 1.0
    rand = detection_metrics(rng.random(1000), flipped, "r")
    assert abs(rand["r/curve_auc"] - 0.5) < 0.06 and abs(rand["r/recall@50"] - 0.5) < 0.15


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_lds_spearman_hand_computed():
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 3.0, 2.0, 4.0]])
    actual = torch.tensor([[10.0, 20.0, 30.0, 40.0], [10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]])
    # ranks of row 3: pred (1,3,2,4) vs (1,2,3,4): d^2 = 0+1+1+0 = 2 -> 1 - 6*2/(4*15) = 0.8
    np.testing.assert_allclose(lds_per_query(pred, actual), [1.0, -1.0, 0.8])
    # a constant row has no rank correlation and is dropped
    assert len(lds_per_query(torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[1.0, 2.0, 3.0]]))) == 0


def test_bootstrap_interval_brackets_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = summarize(rng.normal(0.3, 0.1, 20), 2000, 0)
    large = summarize(rng.normal(0.3, 0.1, 2000), 2000, 0)
    assert small["ci_low"] < small["mean"] < small["ci_high"]
    assert (large["ci_high"] - large["ci_low"]) < (small["ci_high"] - small["ci_low"]) / 5
    assert summarize(np.array([0.5, 0.5]), 100, 0) == {"mean": 0.5, "std": 0.0, "ci_low": 0.5, "ci_high": 0.5, "n": 2}


def test_subset_masks_are_seeded_and_sized():
    a, b = subset_masks(101, 7, 0.5, 3), subset_masks(101, 7, 0.5, 3)
    assert torch.equal(a, b) and (a.sum(1) == 50).all()
    assert not torch.equal(a, subset_masks(101, 7, 0.5, 4))


def test_recall_intervals_are_wilson_binomial_intervals():
    from scipy.stats import binomtest

    # 10 points, flipped = {0, 1, 2, 3}; ranking 0, 4, 1, 5, 2, 6, 3, 7, 8, 9: top 10% (1 point) finds 1 of 4
    scores = np.array([10, 8, 6, 4, 9, 7, 5, 3, 2, 1], dtype=float)
    flipped = np.zeros(10, dtype=bool)
    flipped[:4] = True
    m = detection_metrics(scores, flipped, "x")
    for p, found in ((10, 1), (20, 1), (30, 2), (50, 3)):
        assert m[f"x/recall@{p}"] == found / 4
        ci = binomtest(found, 4).proportion_ci(confidence_level=0.95, method="wilson")
        assert m[f"x/recall@{p}_ci_low"] == pytest.approx(ci.low)
        assert m[f"x/recall@{p}_ci_high"] == pytest.approx(ci.high)
    # a known case by hand: Wilson for 1 of 4 at z = 1.959964
    z, n, ph = 1.959964, 4, 0.25
    centre = (ph + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n))
    assert m["x/recall@10_ci_low"] == pytest.approx(centre - half, abs=1e-6)
    assert m["x/recall@10_ci_high"] == pytest.approx(centre + half, abs=1e-6)


def test_intervals_contain_the_estimate_and_shrink_with_n():
    rng = np.random.default_rng(2)

    def metrics(n):
        flipped = np.zeros(n, dtype=bool)
        flipped[rng.choice(n, n // 10, replace=False)] = True
        return detection_metrics(rng.normal(size=n) + 1.5 * flipped, flipped, "m")

    small, large = metrics(400), metrics(8000)
    for m in (small, large):
        for key in ("recall@10", "recall@20", "recall@30", "recall@40", "recall@50", "roc_auc"):
            assert m[f"m/{key}_ci_low"] <= m[f"m/{key}"] <= m[f"m/{key}_ci_high"]
            assert 0 <= m[f"m/{key}_ci_low"] < m[f"m/{key}_ci_high"] <= 1
    for key in ("recall@10", "roc_auc"):
        width_small, width_large = (m[f"m/{key}_ci_high"] - m[f"m/{key}_ci_low"] for m in (small, large))
        assert width_large < width_small / 3  # 20x the points: about 1/sqrt(20) the width


def test_interval_keys_leave_the_point_estimates_unchanged_and_are_seeded():
    rng = np.random.default_rng(3)
    flipped = rng.random(500) < 0.1
    scores = np.round(rng.normal(size=500) + flipped, 1)  # ties
    m = detection_metrics(scores, flipped, "k")
    assert m["k/roc_auc"] == pytest.approx(roc_auc_score(flipped, scores))
    assert [k for k in m if "_ci_" not in k] == [f"k/recall@{p}" for p in (10, 20, 30, 40, 50)] + [
        "k/curve_auc", "k/roc_auc", "k/ap"]
    assert detection_metrics(scores, flipped, "k") == m  # seeded bootstrap
    assert detection_metrics(scores, flipped, "k", seed=1)["k/roc_auc_ci_low"] != m["k/roc_auc_ci_low"]
    assert "k/roc_auc_ci_low" not in detection_metrics(scores, np.ones(500, dtype=bool), "k")  # AUC undefined


def test_vectorised_weighted_auc_matches_sklearn():
    from influencelab.evaluation import weighted_roc_auc

    rng = np.random.default_rng(4)
    s = np.sort(np.round(rng.normal(size=300), 1))
    f = rng.random(300) < 0.2
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
    w = rng.integers(0, 4, (5, 300)).astype(float)
    expected = [roc_auc_score(f, s, sample_weight=wi) for wi in w]
    np.testing.assert_allclose(weighted_roc_auc(w, f, starts), expected)


def test_paired_difference_cancels_what_the_items_share():
    """Two methods scored on the same 60 items whose values vary a lot from item to item (sd 0.2) but differ by a
    small constant (0.03, noise sd 0.01): the paired interval is about the difference and excludes 0, while the two
    methods' own intervals overlap; pairs with a NaN on either side are left out."""
    rng = np.random.default_rng(0)
    shared = rng.normal(0.3, 0.2, 60)
    a, b = shared + 0.03 + rng.normal(0, 0.01, 60), shared.copy()
    b[:5] = np.nan
    out = paired_difference(a, b, 2000, 0)
    assert out["n"] == 55 and out["diff"] == pytest.approx(np.mean(a[5:] - b[5:]))
    assert 0.02 < out["ci_low"] < out["diff"] < out["ci_high"] < 0.04
    own_a, own_b = summarize(a[5:], 2000, 0), summarize(b[5:], 2000, 0)
    assert own_a["ci_low"] < own_b["ci_high"]  # unpaired, the difference is not resolved
    same = paired_difference(a, a, 100, 0)
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0.0


def test_paired_recall_difference_counts_discordant_flipped_points():
    """A minus B at 10% equals the difference of their recalls; the McNemar p-value is the binomial test of the
    flipped points found by one ranking only; a ranking against itself differs by exactly 0 with p = 1."""
    from scipy.stats import binomtest

    from influencelab.evaluation import paired_recall_difference

    rng = np.random.default_rng(3)
    n = 1000
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, 100, replace=False)] = True
    a = rng.normal(size=n) + 2.5 * flipped  # A separates flipped points better than B
    b = rng.normal(size=n) + 1.0 * flipped
    out = paired_recall_difference(a, b, flipped, 0.1, "x")
    assert out["x"] == pytest.approx(recall_at(a, flipped, 0.1) - recall_at(b, flipped, 0.1), abs=1e-12)
    top_a, top_b = np.argsort(-a)[:100], np.argsort(-b)[:100]
    fa, fb = np.isin(np.arange(n), top_a) & flipped, np.isin(np.arange(n), top_b) & flipped
    only_a, only_b = int((fa & ~fb).sum()), int((fb & ~fa).sum())
    assert out["x_p"] == pytest.approx(binomtest(only_a, only_a + only_b).pvalue)
    assert out["x_ci_low"] < out["x"] < out["x_ci_high"]
    assert out["x_ci_low"] > 0 and out["x_p"] < 1e-3  # a real gap is resolved
    same = paired_recall_difference(a, a, flipped, 0.1, "y")
    assert same["y"] == 0 and same["y_ci_low"] == 0 and same["y_ci_high"] == 0 and same["y_p"] == 1.0

"""Metric computations against hand-computed cases: detection curve/recall/AUC, LDS Spearman, bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influencelab.evaluation import detection_curve, detection_metrics, recall_at
from influencelab.studies import lds_per_query, subset_masks, summarize


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

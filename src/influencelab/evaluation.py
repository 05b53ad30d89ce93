"""Evaluation metrics: mislabel detection (recall vs fraction inspected, AUC, AP), rank statistics, and paired
bootstrap intervals of a difference between two methods on the same items."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import binomtest, bootstrap
from sklearn.metrics import average_precision_score, roc_auc_score

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)
CONFIDENCE = 0.95


def detection_curve(scores: torch.Tensor | np.ndarray, flipped: torch.Tensor | np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of flipped labels found vs fraction of the training set inspected, most suspicious first.

    Higher score = more suspicious. Returns ``(fraction_inspected, recall)``, both starting at 0.
    Ties are broken by position (stable), so the curve is deterministic.
    """
    s = np.asarray(scores, dtype=np.float64)
    f = np.asarray(flipped, dtype=bool)
    order = np.argsort(-s, kind="stable")
    found = np.concatenate([[0], np.cumsum(f[order])])
    n, k = len(s), max(int(f.sum()), 1)
    return np.arange(n + 1) / n, found / k


def recall_at(scores, flipped, fraction: float) -> float:
    """Fraction of flipped labels among the top ``ceil(fraction * n)`` points of the ranking."""
    frac, rec = detection_curve(scores, flipped)
    n = len(frac) - 1
    return float(rec[min(n, math.ceil(fraction * n - 1e-9))])


def recall_interval(found: int, n_flipped: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a recall ``found / n_flipped`` read as a binomial proportion."""
    ci = binomtest(int(found), int(n_flipped)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def weighted_roc_auc(weights: np.ndarray, flipped: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """ROC AUC (ties count 1/2) of points sorted by score, one value per row of ``weights`` [B, n] (a point's
    weight = its count in a resample); ``starts``: the first position of each distinct score."""
    p = np.add.reduceat(weights * flipped, starts, axis=1)  # flipped / clean weight per distinct score
    n = np.add.reduceat(weights * ~flipped, starts, axis=1)
    below = np.cumsum(n, axis=1) - n  # clean weight scored strictly lower
    return (p * (below + 0.5 * n)).sum(1) / (p.sum(1) * n.sum(1))


def roc_auc_bootstrap(scores, flipped, n_boot: int = 1000, seed: int = 0, confidence: float = CONFIDENCE,
                      chunk: int = 100) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC, stratified (flipped and clean points resampled
    separately, so every resample has both and as many flipped as the data). Vectorised: each resample is a
    vector of counts over the points; its AUC (ties count 1/2) is summed over groups of equal scores, so no
    resample is sorted."""
    s = np.asarray(scores, dtype=np.float64)
    f = np.asarray(flipped, dtype=bool)
    order = np.argsort(s, kind="stable")
    s, f = s[order], f[order]
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))  # first position of each score value
    pos, neg = np.flatnonzero(f), np.flatnonzero(~f)
    rng = np.random.default_rng(seed)
    aucs = []
    for b0 in range(0, n_boot, chunk):
        b = min(chunk, n_boot - b0)
        counts = np.zeros((b, len(s)))
        for members in (pos, neg):
            draws = members[rng.integers(0, len(members), (b, len(members)))]
            counts += np.bincount((draws + len(s) * np.arange(b)[:, None]).ravel(),
                                  minlength=b * len(s)).reshape(b, len(s))
        aucs.append(weighted_roc_auc(counts, f, starts))
    lo, hi = np.quantile(np.concatenate(aucs), [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def detection_metrics(scores, flipped, prefix: str, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Recall at 10..50% inspected, curve AUC (area under recall vs fraction), ROC AUC and average precision,
    with 95% intervals: ``recall@K_ci_low/high`` (Wilson, recall = found / n_flipped) and
    ``roc_auc_ci_low/high`` (stratified percentile bootstrap, ``n_boot`` resamples, seeded)."""
    f = np.asarray(flipped, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    frac, rec = detection_curve(s, f)
    out = {f"{prefix}/recall@{int(p * 100)}": recall_at(s, f, p) for p in FRACTIONS}
    out[f"{prefix}/curve_auc"] = float(np.trapezoid(rec, frac))
    if 0 < f.sum() < len(f):
        out[f"{prefix}/roc_auc"] = float(roc_auc_score(f, s))
        out[f"{prefix}/ap"] = float(average_precision_score(f, s))
    n_flipped = int(f.sum())
    if n_flipped > 0:
        for p in FRACTIONS:
            key = f"{prefix}/recall@{int(p * 100)}"
            found = int(round(out[key] * n_flipped))
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = recall_interval(found, n_flipped)
    if 0 < n_flipped < len(f):
        lo, hi = roc_auc_bootstrap(s, f, n_boot, seed)
        out[f"{prefix}/roc_auc_ci_low"], out[f"{prefix}/roc_auc_ci_high"] = lo, hi
    return out


def paired_difference(a, b, n_boot: int = 1000, seed: int = 0, confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean of ``a - b`` over items measured by both (pairs with a NaN on either side are left out) and its
    percentile-bootstrap interval, resampling items (queries), so what the two share (the query, its ground
    truth) cancels. ``n``: the pairs used; ``mean_a``/``mean_b``: the means over those pairs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    out = {"n": int(keep.sum()), "mean_a": float("nan"), "mean_b": float("nan"), "diff": float("nan"),
           "ci_low": float("nan"), "ci_high": float("nan")}
    if len(a) == 0:
        return out
    d = a - b
    out.update(mean_a=float(a.mean()), mean_b=float(b.mean()), diff=float(d.mean()))
    if len(d) == 1 or np.all(d == d[0]):  # no spread: the interval is the value
        out.update(ci_low=out["diff"], ci_high=out["diff"])
        return out
    ci = bootstrap((d,), np.mean, n_resamples=n_boot, confidence_level=confidence, method="percentile",
                   random_state=np.random.default_rng(seed)).confidence_interval
    out.update(ci_low=float(ci.low), ci_high=float(ci.high))
    return out


def paired_recall_difference(scores_a, scores_b, flipped, fraction: float, prefix: str, n_boot: int = 1000,
                             seed: int = 0) -> dict[str, float]:
    """Recall at ``fraction`` inspected of ranking A minus ranking B on the same points, paired: each flipped
    point is found (in the top ``ceil(fraction * n)``) by A, by B, by both or by neither, and the difference of
    recalls is the mean over flipped points of ``found_A - found_B``. Returns ``{prefix}`` (the difference),
    ``{prefix}_ci_low/high`` (percentile bootstrap over the flipped points, the two cut-offs held fixed) and
    ``{prefix}_p`` (exact McNemar test: two-sided binomial test of the discordant points, those found by one
    ranking only). What the two rankings share (which points are hard) cancels, unlike two Wilson intervals."""
    f = np.asarray(flipped, dtype=bool)
    n = len(f)
    k = min(n, math.ceil(fraction * n - 1e-9))

    def found(scores) -> np.ndarray:
        top = np.zeros(n, dtype=bool)
        top[np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]] = True
        return top[f].astype(np.float64)

    a, b = found(scores_a), found(scores_b)
    d = paired_difference(a, b, n_boot=n_boot, seed=seed)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b > 0 else 1.0
    return {prefix: d["diff"], f"{prefix}_ci_low": d["ci_low"], f"{prefix}_ci_high": d["ci_high"],
            f"{prefix}_p": float(p)}

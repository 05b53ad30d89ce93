"""Evaluation metrics: mislabel detection (recall vs fraction inspected, AUC, AP) and rank statistics."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)


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


def detection_metrics(scores, flipped, prefix: str) -> dict[str, float]:
    """Recall at 10..50% inspected, curve AUC (area under recall vs fraction), ROC AUC and average precision."""
    f = np.asarray(flipped, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    frac, rec = detection_curve(s, f)
    out = {f"{prefix}/recall@{int(p * 100)}": recall_at(s, f, p) for p in FRACTIONS}
    out[f"{prefix}/curve_auc"] = float(np.trapezoid(rec, frac))
    if 0 < f.sum() < len(f):
        out[f"{prefix}/roc_auc"] = float(roc_auc_score(f, s))
        out[f"{prefix}/ap"] = float(average_precision_score(f, s))
    return out

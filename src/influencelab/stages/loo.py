"""Leave-one-out: the actual change of a query's loss when one of its most influential training points is removed
and the model retrained, against the predicted change (Koh & Liang style)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from .. import plots
from ..errors import check
from ..pipeline import Context
from ..registry import stage
from .retraining import retrained_measurements


@dataclass
class LOOConfig:
    """``k`` most influential (|score|) training points of each of ``n_queries`` queries, retrained without each
    from ``scratch`` or ``warm`` (``warm_epochs`` at ``warm_lr_scale`` x the learning rate)."""

    n_queries: int = 1
    k: int = 10
    retrain: str = "scratch"
    warm_epochs: int = 3
    warm_lr_scale: float = 0.1

    def __post_init__(self) -> None:
        check(self.retrain in ("scratch", "warm"), "loo.retrain", self.retrain, "use scratch or warm")
        check(self.n_queries >= 1, "loo.n_queries", self.n_queries, "must be >= 1")
        check(self.k >= 1, "loo.k", self.k, "must be >= 1")
        check(self.warm_epochs >= 1, "loo.warm_epochs", self.warm_epochs, "must be >= 1")
        check(self.warm_lr_scale > 0, "loo.warm_lr_scale", self.warm_lr_scale, "must be > 0")


def enough_queries(ctx: Context) -> None:
    c, q = ctx.section("loo"), ctx.query
    n = len(q.indices) if q.indices is not None else q.n
    check(c.n_queries <= n, "loo.n_queries", c.n_queries, f"must be <= the number of queries ({n}); raise query.n")


@stage("loo", section="loo", schema=LOOConfig, precheck=enough_queries)
def loo_stage(ctx: Context) -> None:
    """Actual vs predicted change of a query's loss when one of its most influential training points is
    removed and the model retrained (Koh & Liang style). Predicted = score / n. Every retraining, with or
    without a point, uses the same seed and the same batches (the point is dropped from its batch), so they
    differ only by that point. ``loo.retrain``: ``scratch`` (from initialisation) or ``warm`` (continue from
    the trained model for ``loo.warm_epochs``). Correlations are reported pooled over queries and within each
    query (the within-query one is not inflated by queries whose scores and losses are on different scales)."""
    c = ctx.section("loo")
    warm = (int(c.warm_epochs), float(c.warm_lr_scale)) if c.retrain == "warm" else None
    train, test = ctx.train_data, ctx.test_data
    n = len(train)
    if ctx.pairwise is None:  # a partition job
        return
    scores = ctx.pairwise[0]
    everything = torch.arange(n)
    actual, predicted, query = [], [], []
    for qi in range(min(c.n_queries, len(ctx.query_positions))):
        qpos = ctx.query_positions[qi:qi + 1]
        qx, qy = test.images(qpos), test.targets[qpos]
        base = retrained_measurements(ctx, everything, ctx.trainer.seed, qx, qy, "loo", warm)["loss"][0]
        top = torch.argsort(scores[qi].abs(), descending=True)[: c.k]
        for t in top.tolist():
            loss = retrained_measurements(ctx, everything, ctx.trainer.seed, qx, qy, "loo", warm,
                                          exclude=torch.tensor([t]))["loss"][0]
            actual.append(float(loss - base))
            predicted.append(float(scores[qi, t]) / n)
            query.append(qi)
    a, p, q = np.asarray(actual), np.asarray(predicted), np.asarray(query)

    def corr(fn, x: np.ndarray, y: np.ndarray) -> float:
        return float(fn(x, y).statistic) if len(x) > 2 and np.ptp(x) > 0 and np.ptp(y) > 0 else float("nan")

    within = [(corr(pearsonr, p[q == i], a[q == i]), corr(spearmanr, p[q == i], a[q == i])) for i in np.unique(q)]
    metrics = {"loo/pearson": corr(pearsonr, p, a), "loo/spearman": corr(spearmanr, p, a),
               "loo/pearson_within": float(np.nanmean([w[0] for w in within])) if within else float("nan"),
               "loo/spearman_within": float(np.nanmean([w[1] for w in within])) if within else float("nan"),
               "loo/n_points": len(a)}
    ctx.tracker.log(metrics)
    ctx.tracker.table("loo", ["query", "predicted", "actual"], [[int(i), x, y] for i, x, y in zip(q, p, a, strict=True)])
    ctx.tracker.figure("loo", plots.loo_scatter(p, a, q, metrics))

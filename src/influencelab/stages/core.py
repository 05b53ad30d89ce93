"""The pipeline's own stages: ``train`` (or reuse) the model, ``fit`` the solver, ``pairwise`` and ``self`` scores."""

from __future__ import annotations

from .. import plots
from ..pipeline import Context
from ..registry import stage
from ..train import evaluate


@stage("train")
def train_stage(ctx: Context) -> None:
    """Train (or reuse) the model; log accuracy, loss, time and training curves."""
    model = ctx.model
    test = evaluate(model, ctx.test_data, task=ctx.task)
    train = evaluate(model, ctx.train_data, task=ctx.task)
    info = ctx.train_info
    metric = ctx.task.metric_name  # accuracy (classification), r2 (regression)
    ctx.tracker.log({f"train/test_{metric}": test[metric], "train/test_loss": test["loss"],
                     f"train/train_{metric}": train[metric], "train/train_loss": train["loss"],
                     "train/n_train": len(ctx.train_data), "train/n_flipped": int(ctx.train_data.flipped.sum()),
                     "train/cached": info["cached"], "time/train_s": info["train_s"]})
    ctx.tracker.save_tensors("model.safetensors", {k: v.detach().clone() for k, v in model.state_dict().items()},
                             {"model_key": ctx.model_key})
    ctx.tracker.figure("training", plots.training_curves(info["history"]))
    history = {k: v for k, v in info["history"].items() if v}  # per epoch: loss, train (and test) accuracy
    ctx.tracker.table("training_curve", ["epoch", *history],
                      [[e + 1, *(round(float(v[e]), 5) for v in history.values())]
                       for e in range(len(history["loss"]))], line_x="epoch")


@stage("fit")
def fit_stage(ctx: Context) -> None:
    """Fit the solver (curvature factors), or load them from the cache."""
    _ = ctx.attributor


@stage("pairwise")
def pairwise_stage(ctx: Context) -> None:
    """Query x train influence scores -> ``scores/pairwise.safetensors``."""
    s = ctx.pairwise
    if s is not None:
        ctx.save_scores("pairwise", s, {"query_indices": ctx.test_data.indices[ctx.query_positions]})


@stage("self")
def self_stage(ctx: Context) -> None:
    """Self-influence of every training point -> ``scores/self.safetensors``."""
    s = ctx.self_influence
    if s is not None:
        ctx.save_scores("self", s, {})

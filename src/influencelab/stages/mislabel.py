"""Mislabel detection (paper Fig. 3): rank training points by self-influence; recall of flipped labels beside
the loss, gradient-norm (identity) and random baselines.

Detectors that combine them (each from what a user has; the flip mask only scores them):

* ``loss_and_<ranking>``: the rank average of the loss and of ``<ranking>`` (``self_influence``, ``identity``,
  ``relatif``, ``heldout_harm``): a point ranks high when both put it high (ties share their mean rank);
* ``relatif`` (``mislabel.relatif=true``): self-influence normalised by curvature, RelatIF's ``g^T (G + λI)^-1 g /
  ||(G + λI)^-1 g||`` (Barshan et al. 2020), at the first damping: one more pass over the training set with the
  solver's gradients and preconditioner (a curvature solver of the parameters' gradients);
* ``heldout_harm`` (``mislabel.heldout=true``): influence on a held-out split, the harm a training point does to the
  run's query points (``query.n`` test points, never trained on): ``sum_q max(0, -I(q, z))`` from the pairwise scores
  at the first damping (computed, or read from the ``pairwise`` stage's).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from .. import plots
from ..errors import ConfigError
from ..evaluation import detection_curve, detection_metrics, paired_recall_difference
from ..metric_names import metric_name, parse_metric_name
from ..pipeline import Context
from ..registry import report_plot, stage
from ..solvers.base import needs_parameter_space
from ..train import per_example_loss

#: the rankings combined with the loss by their rank average (those present in a run)
COMBINED = ("self_influence", "identity", "relatif", "heldout_harm")


@dataclass
class MislabelConfig:
    """``relatif``: also rank by RelatIF (self-influence normalised by curvature, and its rank average with the
    loss; one more pass over the training set); ``heldout``: also rank by the harm done to the query points (the
    pairwise scores of ``query.n`` test points), and its rank average with the loss."""

    relatif: bool = False
    heldout: bool = False


def needs_label_noise(ctx: Context) -> None:
    """Flipped labels are what this stage detects: ``dataset.label_noise`` must be > 0."""
    if not ctx.task.has_classes:
        raise ConfigError(f"stage mislabel needs class labels: task={ctx.task.name} has none; drop it from stages")
    if not ctx.dataset_spec.label_noise > 0:
        raise ConfigError(f"dataset.label_noise={ctx.dataset_spec.label_noise} is invalid for stage mislabel: "
                          f"it needs flipped labels; set e.g. dataset.label_noise=0.1")
    if ctx.section("mislabel").relatif:
        solver = ctx.new_solver()
        needs_parameter_space(solver, "mislabel with mislabel.relatif=true", "(G + λI)^-1 g to normalise by")
        if solver.name == "identity":
            raise ConfigError("mislabel.relatif=true is invalid with solver=identity: its RelatIF is the gradient norm "
                              "(already the identity ranking); use a curvature solver, e.g. solver=ekfac")


def rank_average(*scores: np.ndarray) -> np.ndarray:
    """The mean of the rankings' ranks (1 = lowest score; ties share their mean rank), in ``(0, 1]``."""
    return np.mean([rankdata(np.asarray(s, dtype=np.float64)) for s in scores], axis=0) / len(scores[0])


def heldout_harm(pairwise: np.ndarray) -> np.ndarray:
    """Per training point, the summed harm to held-out queries, ``sum_q max(0, -I(q, z))`` of scores ``[n_query,
    n_train]`` (positive = helpful)."""
    return np.clip(-np.asarray(pairwise, dtype=np.float64), 0.0, None).sum(0)


def relatif_scores(ctx: Context) -> np.ndarray:
    """RelatIF per training point at the solver's first damping: ``g^T (G + λI)^-1 g / ||(G + λI)^-1 g||`` with
    the run's (first) model, solver gradients and preconditioner, ``score.batch_size`` points at a time."""
    attr = ctx.attributor
    solver, model, d = attr.solver, attr.model, attr.dampings[0]
    out = torch.empty(len(ctx.train_data), dtype=torch.float64)
    for x, y, pos in ctx.train_data.batches(ctx.score.batch_size):
        g = solver.train_grads(model, x, y)
        h = attr.precondition(g, [d])[0]
        out[pos] = ((h.double() * g.double()).sum(1) / h.double().norm(dim=1).clamp_min(1e-300)).cpu()
    return out.numpy()


@stage("mislabel", section="mislabel", schema=MislabelConfig, precheck=needs_label_noise)
def mislabel_stage(ctx: Context) -> None:
    """Rank training points by self-influence; recall of flipped labels beside the loss, gradient-norm
    (identity) and random baselines (paper Fig. 3). Writes metrics, a figure and ``mislabel_curve.csv``."""
    flipped = ctx.train_data.flipped
    if ctx.self_influence is None:  # a partition job
        return
    rankings = {"self_influence": ctx.self_influence[0].numpy()}
    if ctx.solver.name != "identity":
        rankings["identity"] = ctx.baseline_self_influence("identity").numpy()
    if ctx.section("mislabel").relatif:
        rankings["relatif"] = relatif_scores(ctx)
    if ctx.section("mislabel").heldout:
        if ctx.pairwise is None:  # a partition job
            return
        rankings["heldout_harm"] = heldout_harm(ctx.pairwise[0].numpy())
    rankings["loss"] = per_example_loss(ctx.model, ctx.train_data, task=ctx.task).numpy()
    for name in COMBINED:
        if name in rankings:
            rankings[f"loss_and_{name}"] = rank_average(rankings["loss"], rankings[name])
    rankings["random"] = np.random.default_rng(ctx.cfg.seed).random(len(flipped))
    metrics: dict[str, float] = {}
    for name, scores in rankings.items():
        metrics.update(detection_metrics(scores, flipped.numpy(), f"mislabel/{name}"))
    # every ranking against the loss baseline, paired over the flipped points (McNemar-style)
    for name, scores in rankings.items():
        if name != "loss":
            metrics.update(versus_loss(scores, rankings["loss"], flipped.numpy(), f"mislabel/{name}"))
    by_damping = {}  # a damping list: every value from one pass
    for di, d in enumerate(ctx.solver.dampings):
        by_damping[d] = detection_metrics(ctx.self_influence[di].numpy(), flipped.numpy(), "m")
        by_damping[d].update(versus_loss(ctx.self_influence[di].numpy(), rankings["loss"], flipped.numpy(), "m"))
        if di > 0:
            metrics.update({metric_name("mislabel/self_influence", d, k[2:], exact=True): v
                            for k, v in by_damping[d].items()})
    ctx.tracker.log(metrics)
    damping_table(ctx, by_damping)
    extra = {metric_name("self_influence", d, exact=True): ctx.self_influence[di].numpy()
             for di, d in enumerate(ctx.solver.dampings) if di > 0}
    labels = {"self_influence": f"self-influence ({ctx.solver.name}, λ={ctx.solver.dampings[0]})",
              "identity": "gradient norm (identity)"}
    shown = {labels.get(k, k): v for k, v in rankings.items()}
    shown.update({f"self-influence ({ctx.solver.name}, λ={parse_metric_name(k)[1]})": v for k, v in extra.items()})
    ctx.tracker.figure("mislabel_detection", plots.detection_curves(
        shown, flipped.numpy(), f"{ctx.dataset_spec.name}: {int(flipped.sum())} flipped of {len(flipped)}"))
    grid = np.linspace(0, 1, 201)
    cols = {name: np.interp(grid, *detection_curve(s, flipped.numpy())) for name, s in {**rankings, **extra}.items()}
    ctx.tracker.table("mislabel_curve", ["fraction", *cols],
                      [[round(float(g), 4)] + [round(float(c[i]), 5) for c in cols.values()]
                       for i, g in enumerate(grid)], line_x="fraction")


def versus_loss(scores, loss, flipped, prefix: str) -> dict[str, float]:
    """``{prefix}/minus_loss_topK`` (K = 10, 20; no ``@``, which marks a damping): recall at K% of this ranking
    minus the loss baseline's, with its paired 95% interval and McNemar p-value
    (:func:`~influencelab.evaluation.paired_recall_difference`)."""
    out: dict[str, float] = {}
    for k in (10, 20):
        out.update(paired_recall_difference(scores, loss, flipped, k / 100, f"{prefix}/minus_loss_top{k}"))
    return out


def damping_table(ctx: Context, by_damping: dict) -> None:
    """``mislabel_by_damping.csv`` (and a W&B table, with line charts against λ when there are several numeric
    dampings): one row per damping, the damping as a column, so it can be an axis or a pivot key."""
    keys = [k[2:] for k in next(iter(by_damping.values()))]
    rows = []
    for d, m in by_damping.items():
        lam = ctx.solver.resolve_damping(d) if ctx.solver.name != "identity" else float("nan")
        rows.append([d, lam, *(m.get(f"m/{k}", float("nan")) for k in keys)])
    numeric = len(rows) > 1 and all(isinstance(r[0], float) for r in rows)
    ctx.tracker.table("mislabel_by_damping", ["damping", "lambda", *keys], rows, line_x="lambda" if numeric else None)


@report_plot("mislabel")
def report_figure(root: Path, rows: list[dict[str, Any]], fig_dir: Path) -> list[Path]:
    """The comparison figure of a sweep's mislabel jobs (``influencelab-report``)."""
    from ..plots import labels, pyplot

    plt = pyplot()
    out: list[Path] = []
    # detection curves across runs
    curves = [(r, root / r["job"] / "mislabel_curve.csv") for r in rows]
    curves = [(r, p) for r, p in curves if p.exists()]
    names = dict(zip((r["job"] for r, _ in curves), labels([r for r, _ in curves])))
    if curves:
        fig_dir.mkdir(exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 4.5))
        # several jobs: a colour per job, a line style per ranking (random once, grey); one job: a colour per ranking
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        styles = {"self_influence": "-", "identity": "--", "loss": ":", "random": "-."}
        for j, (r, p) in enumerate(curves):
            with open(p) as f:
                data = list(csv.DictReader(f))
            for m, col in enumerate(c for c in data[0] if c != "fraction"):
                if col == "random" and j > 0:
                    continue
                several = len(curves) > 1
                color = "grey" if col == "random" else colors[(j if several else m) % len(colors)]
                ax.plot([float(d["fraction"]) for d in data], [float(d[col]) for d in data], color=color,
                        linestyle=styles.get(col, "-") if several else "-",
                        label=f"{col} [{names[r['job']]}]" if several and col != "random" else col)
        ax.set(xlabel="fraction inspected", ylabel="fraction of flipped labels found", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
        out.append(fig_dir / "detection_curves.png")
        fig.savefig(out[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    # recall and ROC AUC against the damping, one line per job (jobs with a damping list, or a damping sweep)
    tables = [(r, root / r["job"] / "mislabel_by_damping.csv") for r in rows]
    series = []
    for r, p in tables:
        if p.exists():
            with open(p) as f:
                data = [d for d in csv.DictReader(f) if d["lambda"] not in ("", "nan")]
            if data:  # a job without a damping (identity: λ is nan) has no point on this axis
                series.append((r, data))
    if sum(len(d) for _, d in series) > 1:
        fig_dir.mkdir(exist_ok=True)
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        by_label: dict[str, list] = {}
        for (_r, data), name in zip(series, labels([r for r, _ in series], exclude=("solver.damping",), same="λ")):
            by_label.setdefault(name, []).extend(data)  # a damping sweep's jobs form one line
        for name, data in by_label.items():
            data = sorted(data, key=lambda d: float(d["lambda"]))
            lam = [float(d["lambda"]) for d in data]
            for ax, key in zip(axes, ("recall@10", "recall@20", "roc_auc"), strict=True):
                line, = ax.plot(lam, [float(d[key]) for d in data], "-o", markersize=3, label=name)
                if f"{key}_ci_low" in data[0]:  # the 95% interval (Wilson for recall, bootstrap for AUC)
                    ax.fill_between(lam, [float(d[f"{key}_ci_low"]) for d in data],
                                    [float(d[f"{key}_ci_high"]) for d in data], color=line.get_color(), alpha=0.15)
                ax.set(xscale="log", xlabel="damping λ", ylabel=key, title=f"self-influence {key} vs damping (95% CI)")
        axes[0].legend(fontsize=6)
        fig.tight_layout()
        out.append(fig_dir / "mislabel_vs_damping.png")
        fig.savefig(out[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return out

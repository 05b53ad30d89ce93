"""Mislabel detection (paper Fig. 3): rank training points by self-influence; recall of flipped labels beside
the loss, gradient-norm (identity) and random baselines."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from .. import plots
from ..errors import ConfigError
from ..evaluation import detection_curve, detection_metrics
from ..pipeline import Context
from ..train import per_example_loss
from .registry import report_plot, stage


def needs_label_noise(ctx: Context) -> None:
    """Flipped labels are what this stage detects: ``dataset.label_noise`` must be > 0."""
    if not ctx.dataset_spec.label_noise > 0:
        raise ConfigError(f"dataset.label_noise={ctx.dataset_spec.label_noise} is invalid for stage mislabel: "
                          f"it needs flipped labels; set e.g. dataset.label_noise=0.1")


@stage("mislabel", precheck=needs_label_noise)
def mislabel_stage(ctx: Context) -> None:
    """Rank training points by self-influence; recall of flipped labels beside the loss, gradient-norm
    (identity) and random baselines (paper Fig. 3). Writes metrics, a figure and ``mislabel_curve.csv``."""
    flipped = ctx.train_data.flipped
    if ctx.self_influence is None:  # a partition job
        return
    rankings = {"self_influence": ctx.self_influence[0].numpy()}
    if ctx.solver.name != "identity":
        rankings["identity"] = ctx.baseline_self_influence("identity").numpy()
    rankings["loss"] = per_example_loss(ctx.model, ctx.train_data).numpy()
    rankings["random"] = np.random.default_rng(ctx.cfg.seed).random(len(flipped))
    metrics: dict[str, float] = {}
    for name, scores in rankings.items():
        metrics.update(detection_metrics(scores, flipped.numpy(), f"mislabel/{name}"))
    for di, d in enumerate(ctx.solver.dampings[1:], start=1):  # a damping list: every value from one pass
        metrics.update(detection_metrics(ctx.self_influence[di].numpy(), flipped.numpy(),
                                         f"mislabel/self_influence@{d}"))
    ctx.tracker.log(metrics)
    labels = {"self_influence": f"self-influence ({ctx.solver.name})", "identity": "gradient norm (identity)"}
    shown = {labels.get(k, k): v for k, v in rankings.items()}
    ctx.tracker.figure("mislabel_detection", plots.detection_curves(
        shown, flipped.numpy(), f"{ctx.dataset_spec.name}: {int(flipped.sum())} flipped of {len(flipped)}"))
    grid = np.linspace(0, 1, 201)
    cols = {name: np.interp(grid, *detection_curve(s, flipped.numpy())) for name, s in rankings.items()}
    ctx.tracker.table("mislabel_curve", ["fraction", *cols],
                      [[round(float(g), 4)] + [round(float(c[i]), 5) for c in cols.values()]
                       for i, g in enumerate(grid)], line_x="fraction")


@report_plot("mislabel")
def report_figure(root: Path, rows: list[dict[str, Any]], fig_dir: Path) -> list[Path]:
    """The comparison figure of a sweep's mislabel jobs (``influencelab-report``)."""
    from ..report import labels, pyplot

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
    return out

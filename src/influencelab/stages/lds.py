"""Linear Datamodeling Score: Spearman, per query, between the predicted (sum of scores over a subset) and the
actual retrained query loss/margin across random subsets of the training set."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from ..errors import check
from ..metric_names import metric_name
from ..pipeline import Context
from ..progress import progress
from ..registry import report_plot, stage
from .retraining import retrained_measurements


@dataclass
class LDSConfig:
    """``n_subsets`` random subsets of ``fraction`` of the training set, each retrained ``seeds_per_subset``
    times (seed ``subset_seed`` for the subsets); ``bootstrap`` resamples for the interval over queries."""

    n_subsets: int = 100
    fraction: float = 0.5
    seeds_per_subset: int = 1
    subset_seed: int = 12345
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        check(self.n_subsets >= 2, "lds.n_subsets", self.n_subsets, "must be >= 2")
        check(0 < self.fraction < 1, "lds.fraction", self.fraction, "must be in (0, 1)")
        check(self.seeds_per_subset >= 1, "lds.seeds_per_subset", self.seeds_per_subset, "must be >= 1")
        check(self.bootstrap >= 1, "lds.bootstrap", self.bootstrap, "must be >= 1")


def subset_masks(n: int, n_subsets: int, fraction: float, seed: int) -> torch.Tensor:
    """``[n_subsets, n]`` boolean masks, each keeping ``round(fraction * n)`` points (seeded)."""
    rng = np.random.default_rng(seed)
    k = int(round(fraction * n))
    masks = torch.zeros(n_subsets, n, dtype=torch.bool)
    for m in range(n_subsets):
        masks[m, torch.as_tensor(rng.choice(n, size=k, replace=False))] = True
    return masks


@stage("lds", section="lds", schema=LDSConfig)
def lds_stage(ctx: Context) -> None:
    """LDS: Spearman, per query, between predicted (sum of scores over a subset) and actual retrained query
    loss/margin across random subsets; mean ± std and a bootstrap CI over queries. The ground truth is
    cached per subset and seed (resumable) and shared by every solver."""
    c = ctx.section("lds")
    train, test = ctx.train_data, ctx.test_data
    qpos = ctx.query_positions
    qx, qy = test.images(qpos), test.targets[qpos]
    masks = subset_masks(len(train), c.n_subsets, c.fraction, c.subset_seed)
    truth = {k: torch.zeros(c.n_subsets, len(qpos), dtype=torch.float64) for k in ctx.task.measurements}
    t0 = time.perf_counter()
    for m in progress(range(c.n_subsets), desc="lds subsets"):
        pos = masks[m].nonzero().squeeze(1)
        for s in range(c.seeds_per_subset):
            meas = retrained_measurements(ctx, pos, ctx.trainer.seed + 1 + s, qx, qy, "lds")
            for k in truth:
                truth[k][m] += meas[k] / c.seeds_per_subset
    truth_s = time.perf_counter() - t0
    if ctx.pairwise is None:  # a partition job
        return
    scores = ctx.pairwise.double()  # [n_damping, n_query, n_train]
    metrics: dict = {"time/lds_truth_s": truth_s}
    rows: list[list] = []  # per query: what a paired comparison of two runs needs (lds.csv)
    query_ids = test.indices[qpos].tolist()
    for di, d in enumerate(ctx.solver.dampings):
        pred = scores[di] @ masks.double().T  # [n_query, n_subsets]: predicted helpfulness
        at = None if di == 0 else d  # the first damping under the bare name (lds/mean), the others lds/mean@<d>
        for meas, sign in ctx.task.measurements.items():  # classification: loss and margin; regression: loss
            per_query = lds_per_query(pred, sign * truth[meas].T, dropna=False)
            stats = summarize(per_query, c.bootstrap, ctx.cfg.seed)
            name = "lds" if meas == "loss" else f"lds_{meas}"
            metrics.update({metric_name(f"{name}/{k}", at, exact=True): v for k, v in stats.items()})
            rows += [[d, meas, q, v] for q, v in zip(query_ids, per_query.tolist(), strict=True)]
    ctx.tracker.log(metrics)
    ctx.tracker.table("lds", ["damping", "measurement", "query", "lds"], rows)
    ctx.tracker.save_tensors("scores/lds_truth.safetensors", {"masks": masks, **truth,
                                                             "query_indices": test.indices[qpos]})


def lds_per_query(pred: torch.Tensor, actual: torch.Tensor, dropna: bool = True) -> np.ndarray:
    """Spearman correlation per row of ``pred`` vs ``actual`` (``[n_query, n_subsets]``); a constant row has
    none: dropped, or NaN in its place with ``dropna=False`` (rows stay aligned with the queries)."""
    with warnings.catch_warnings():  # a constant row has no rank correlation
        warnings.simplefilter("ignore")
        out = np.asarray([spearmanr(p, a).statistic for p, a in zip(pred.numpy(), actual.numpy(), strict=True)],
                         dtype=np.float64)
    return out[np.isfinite(out)] if dropna else out


def summarize(values: np.ndarray, n_bootstrap: int, seed: int) -> dict[str, float]:
    """Mean, std and a 95% percentile-bootstrap interval of the mean (resampling queries); NaNs (queries
    without a rank correlation) are left out."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    boots = rng.choice(values, size=(n_bootstrap, len(values)), replace=True).mean(1)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "ci_low": float(np.percentile(boots, 2.5)), "ci_high": float(np.percentile(boots, 97.5)),
            "n": len(values)}


def paired_lds(root: Path, rows: list[dict[str, Any]], n_boot: int = 1000, seed: int = 0):
    """Every pair of (job, damping) of a sweep whose jobs wrote ``lds.csv``, per measurement: the mean
    difference in LDS over the queries both scored, with a paired bootstrap interval over queries
    (:func:`~influencelab.evaluation.paired_difference`). Pairs share the queries by their test index; a pair
    of jobs with the same ground truth (same model and subsets, other solver or damping) isolates the method,
    one with another ground truth (``lds.seeds_per_subset``) the truth. ``None`` without two such entries."""
    import pandas as pd

    from ..evaluation import paired_difference
    from ..plots import labels

    parts, names = [], labels(rows)
    for r, name in zip(rows, names, strict=True):
        path = root / str(r["job"]) / "lds.csv"
        if path.exists():
            parts.append(pd.read_csv(path).assign(job=str(r["job"]), label=name))
    if not parts:
        return None
    per = pd.concat(parts, ignore_index=True)
    multi = per.groupby("job")["damping"].nunique()
    per["label"] = [f"{lab}, λ={d}" if multi[j] > 1 else lab
                    for lab, j, d in zip(per["label"], per["job"], per["damping"], strict=True)]
    out = []
    for meas, frame in per.groupby("measurement", sort=False):
        wide = frame.pivot(index="query", columns=["job", "damping", "label"], values="lds")
        keys = list(dict.fromkeys(zip(frame["job"], frame["damping"], frame["label"], strict=True)))
        for i, ka in enumerate(keys):
            for kb in keys[i + 1:]:
                stats = paired_difference(wide[ka].to_numpy(), wide[kb].to_numpy(), n_boot, seed)
                out.append({"measurement": meas, "job_a": ka[0], "damping_a": ka[1], "a": ka[2],
                            "job_b": kb[0], "damping_b": kb[1], "b": kb[2], **stats})
    return pd.DataFrame(out) if out else None


@report_plot("lds")
def report_figure(root: Path, rows: list[dict[str, Any]], fig_dir: Path) -> list[Path]:
    """LDS per job with its bootstrap interval (``influencelab-report``); beside it, ``lds_paired.csv``: every
    pair's difference with a paired interval (:func:`paired_lds`)."""
    from ..plots import labels, pyplot

    paired = paired_lds(root, rows)
    if paired is not None:
        paired.to_csv(root / "lds_paired.csv", index=False)
    plt = pyplot()
    out: list[Path] = []
    # LDS per solver with intervals
    lds = [r for r in rows if "lds/mean" in r]
    if lds:
        fig_dir.mkdir(exist_ok=True)
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(lds)), 3.8))
        lo = [r["lds/mean"] - r.get("lds/ci_low", r["lds/mean"]) for r in lds]
        hi = [r.get("lds/ci_high", r["lds/mean"]) - r["lds/mean"] for r in lds]
        ax.bar(range(len(lds)), [r["lds/mean"] for r in lds], yerr=[lo, hi], capsize=4)
        ax.set_xticks(range(len(lds)), labels(lds), rotation=30, ha="right", fontsize=7)
        ax.set(ylabel="LDS (Spearman, mean over queries)", title="LDS with 95% bootstrap CI")
        fig.tight_layout()
        out.append(fig_dir / "lds.png")
        fig.savefig(out[-1], dpi=120)
        plt.close(fig)
    return out

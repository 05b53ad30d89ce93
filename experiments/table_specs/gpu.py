"""Section 6c of RESULTS.md: EK-FAC and K-FAC against kronfluence on one GPU (benchmarks/gpu/run.sh on a lent
device; benchmarks/gpu/summarize.py commits its files)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
from tables_engine import Cell, Ref, Section, cell, exists, load, ref

from table_specs.benchmarks import impl_value, peer_ratio

SECTION = Section("6c. On a GPU: EK-FAC and K-FAC against kronfluence")

_GPU = "benchmarks/results/gpu/bench.csv"
GPU_HEADER = ["model (training points, px)", "strategy, precision", "run", "fit + self s: ours / kronfluence",
              "ratio (target ≤ 0.5)", "pairwise s: ours / kronfluence", "ratio", "peak CUDA GB: ours / kronfluence",
              "Spearman self / pairwise"]


def _peak_gb(row: pd.Series) -> float:
    return max(row["peak_fit_mb"], row["peak_self_mb"], row["peak_pairwise_mb"]) / 1024


def gpu_rows(src: str = _GPU) -> list[list[str | Cell]]:
    """One row per measured (run, model, strategy, precision) of a GPU bench.csv (ours measured)."""
    rows: list[list[str | Cell]] = []
    if not exists(src):
        return rows
    df = load(src)
    for _, r in df[(df["impl"] == "influencelab") & df["fit_s"].notna()].iterrows():
        w = dict(run=r["run"], case=r["case"], strategy=r["strategy"], precision=r["precision"])

        def R(key: Callable[[pd.DataFrame], Any], w: dict = w) -> Ref:
            return ref(src, key, **w)

        def ours_theirs(template: str, col: str | Callable[[pd.Series], Any]) -> Cell:
            return cell(template, R(impl_value("influencelab", col)), R(impl_value("kronfluence", col)))

        rows.append([f"{r['model']} ({int(r['n_train']):,}, {int(r['image_size'])})",
                     f"{'EK-FAC' if r['strategy'] == 'ekfac' else 'K-FAC'}, {r['precision']}", str(r["run"]),
                     ours_theirs("{:s3} / {:s3}", "fit_self_s"), cell("**{:.2}**", R(peer_ratio("fit_self_s"))),
                     ours_theirs("{:s3} / {:s3}", "pairwise_s"), cell("{:.2}", R(peer_ratio("pairwise_s"))),
                     ours_theirs("{:s2} / {:s2}", _peak_gb),
                     cell("{:.4} / {:.4}", R(impl_value("kronfluence", "spearman_self")),
                          R(impl_value("kronfluence", "spearman_pairwise")))])
    return rows


SECTION.table("gpu", GPU_HEADER, gpu_rows, "6c: EK-FAC/K-FAC vs kronfluence on one GPU (benchmarks/gpu/run.py)")

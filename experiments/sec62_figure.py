"""Section 3's figure (issue 29 item 6): for every solver, the IHVP relative error and the Spearman correlation of
its pairwise scores with the exact reference's, against damping: the median over the queries as a line, the
quartiles as a band; a point whose reference did not meet its residual tolerance is drawn hollow.

Reads the committed per-query files the ihvp stage writes (``experiments/results/<sweep>/job<N>_ihvp_queries.csv``)
and each job's reference residuals (``job<N>_ihvp.csv``)::

    python experiments/sec62_figure.py OUT.png "EK-FAC=ihvp_cnn_exact/0" "K-FAC=ihvp_cnn_exact/1" ...

A series may join jobs with ``+`` (``LABEL=SWEEP_A/0+SWEEP_B/0``): dampings that ran as sweeps of their own.

Also writes ``OUT.csv``: the plotted medians and quartiles per series and damping (what the figure shows).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"


def jobs(where: str) -> list[tuple[str, str]]:
    """``SWEEP/JOB`` or several joined by ``+`` (a series whose dampings ran as sweeps of their own)."""
    return [(sw, j) for sw, _, j in (part.partition("/") for part in where.split("+"))]


def read_jobs(where: str, table: str) -> pd.DataFrame:
    """``job<N>_<table>.csv`` of every job of ``where``, one below the other, each row's job in ``source``."""
    return pd.concat([pd.read_csv(RESULTS / sw / f"job{j}_{table}.csv").assign(source=f"{sw}/job{j}")
                      for sw, j in jobs(where)], ignore_index=True)


def series_frame(spec: str) -> pd.DataFrame:
    """``LABEL=SWEEP/JOB`` -> per damping: the job it ran in (``source``), median and quartiles of rel_error and
    spearman, and whether the reference converged there."""
    label, _, where = spec.partition("=")
    q = read_jobs(where, "ihvp_queries")
    ref = read_jobs(where, "ihvp")[["damping", "source", "ref_converged", "ref_rel_residual"]]
    stats = q.groupby("damping").agg(
        error_q25=("rel_error", lambda s: s.quantile(0.25)), error_median=("rel_error", "median"),
        error_q75=("rel_error", lambda s: s.quantile(0.75)),
        spearman_q25=("spearman", lambda s: s.quantile(0.25)), spearman_median=("spearman", "median"),
        spearman_q75=("spearman", lambda s: s.quantile(0.75)), queries=("rel_error", "size")).reset_index()
    out = stats.merge(ref, on="damping", how="left")
    out.insert(0, "series", label)
    out.insert(1, "source", out.pop("source"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the figure (.png); its data goes beside it as .csv")
    ap.add_argument("series", nargs="+", help="LABEL=SWEEP/JOB")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [series_frame(s) for s in args.series]
    data = pd.concat(frames, ignore_index=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    for f in frames:
        f = f.sort_values("damping")
        (line,) = a1.plot(f["damping"], f["error_median"], marker="o", label=f["series"].iloc[0])
        a1.fill_between(f["damping"], f["error_q25"], f["error_q75"], color=line.get_color(), alpha=0.18)
        a2.plot(f["damping"], f["spearman_median"], marker="o", color=line.get_color())
        a2.fill_between(f["damping"], f["spearman_q25"], f["spearman_q75"], color=line.get_color(), alpha=0.18)
        bad = f[~f["ref_converged"].astype(bool)]
        for ax, col in ((a1, "error_median"), (a2, "spearman_median")):
            ax.scatter(bad["damping"], bad[col], facecolors="white", edgecolors=line.get_color(), zorder=3)
    n = int(data["queries"].max())
    a1.set(xscale="log", yscale="log", xlabel="damping λ", ylabel="relative error ‖x − x*‖ / ‖x*‖",
           title=f"IHVP error vs the exact reference\n(median, quartiles over {n} queries)")
    a2.set(xscale="log", xlabel="damping λ", ylabel="Spearman ρ with the reference's scores",
           title="rank agreement of pairwise scores", ylim=(min(0.0, float(data["spearman_q25"].min())), 1.02))
    if not data["ref_converged"].astype(bool).all():
        a1.scatter([], [], facecolors="white", edgecolors="gray", label="hollow: reference residual above 1e-6")
    fig.legend(*a1.get_legend_handles_labels(), loc="outside right center")
    if args.title:
        fig.suptitle(args.title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    data.to_csv(args.out.with_suffix(".csv"), index=False)
    print(f"wrote {args.out} and {args.out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()

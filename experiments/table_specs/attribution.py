"""Section 2 of RESULTS.md: most helpful and harmful training images, and the leave-one-out check (runs loo,
loo_warm). Correlations come from report.csv; sign agreement, slope and the median ratio from each job's
(query, predicted, actual) pairs, job<N>_loo.csv (copied by run_here.sh from multirun/<name>/<N>/loo.csv)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd
from tables_engine import Cell, Job, Section, Sweep, cell, fmt, job, timing

SECTION = Section("2. Most helpful and most harmful training images; leave-one-out")


def _sign(df: pd.DataFrame) -> float:
    """Share of the pairs whose predicted and actual change have the same sign (an actual change of exactly 0,
    as for the query whose loss is ~5e-7, agrees with nothing)."""
    sign = lambda s: s.gt(0).astype(int) - s.lt(0).astype(int)  # noqa: E731
    return float((sign(df["predicted"]) == sign(df["actual"])).mean())


def _slope(df: pd.DataFrame) -> float:
    """Least-squares slope of actual on predicted, pooled over the queries."""
    p, a = df["predicted"], df["actual"]
    return float(((p - p.mean()) * (a - a.mean())).sum() / ((p - p.mean()) ** 2).sum())


def _ratio(df: pd.DataFrame) -> float:
    return float((df["predicted"].abs() / df["actual"].abs()).median())


def loo_row(label: str, damping: str, name: str, which: Job, bold: tuple[str, ...] = ()) -> list[str | Cell]:
    S = Sweep(name)

    def b(m: str) -> str:
        return "**{:.2}**" if m in bold else "{:.2}"
    return [label, damping,
            cell(b("pearson_within") + " / {:.2}", S("loo/pearson_within", which), S("loo/pearson", which)),
            cell(b("spearman_within") + " / {:.2}", S("loo/spearman_within", which), S("loo/spearman", which)),
            *(cell(f, S.job_ref(which, "loo.csv", key)) for f, key in (("{:%0}", _sign), ("{:g2}", _slope),
                                                                       ("{:s2}", _ratio)))]


SECTION.table("loo", ["retraining", "λ", "Pearson within / pooled", "Spearman within / pooled", "sign agreement",
                      "slope actual ~ predicted", "median \\|pred\\| / \\|actual\\|"], [
    loo_row("scratch", "1e-3", "loo", job()),
    loo_row("warm", "1e-3", "loo_warm", job("solver.damping=1e-3"), bold=("pearson_within",)),
    loo_row("warm", "1e-2", "loo_warm", job("solver.damping=1e-2")),
    loo_row("warm", "0.1", "loo_warm", job("solver.damping=0.1"), bold=("spearman_within",)),
], "2: leave-one-out against the prediction")

# ---------------------------------------------------------------------------------------------------------------
# prose numbers (RESULTS.md's text quotes them as <!-- num:NAME -->...<!-- /num -->)

_ATT, _LOO, _LOOW = Sweep("attribution"), Sweep("loo"), Sweep("loo_warm")
SECTION.number("attribution_test_acc", cell("{:.3}", _ATT("train/test_accuracy")))
for _stage in ("train", "fit", "pairwise"):
    SECTION.number(f"attribution_{_stage}_s", cell("{:d}", _ATT(f"time/{_stage}_s")))
SECTION.number("loo_test_acc", cell("{:.3}", _LOO("train/test_accuracy")))
SECTION.number("loo_train_loss", cell("{:e1}", _LOO("train/train_loss")))


def _loss_change_scale(query: int) -> Callable[[pd.DataFrame], str]:
    """The order of magnitude of the median |actual change| of one query's loss (scratch run), "1e-2"."""
    def get(df: pd.DataFrame) -> str:
        return f"1e{round(math.log10(df.loc[df['query'] == query, 'actual'].abs().median()))}"
    return get


for _q in (0, 4):
    SECTION.number(f"loo_query{_q}_change", cell("{}", _LOO.job_ref(job(), "loo.csv", _loss_change_scale(_q))))
for _name in ("loo", "loo_warm"):
    SECTION.number(f"{_name}_wall_s", lambda n=_name: fmt(timing(n), "d"))
SECTION.number("loo_scratch_pearson_within", cell("{:.2}", _LOO("loo/pearson_within")))
SECTION.number("loo_scratch_pearson", cell("{:.2}", _LOO("loo/pearson")))
SECTION.number("loo_warm_pearson_within_range", cell("{}", _LOOW.every_job(
    lambda df: f"{fmt(df['loo/pearson_within'].min(), '.2')}–{fmt(df['loo/pearson_within'].max(), '.2')}")))
SECTION.number("loo_warm_ratio_1e-3", cell("{:s2}", _LOOW.job_ref(job("solver.damping=1e-3"), "loo.csv", _ratio)))
SECTION.number("loo_warm_ratio_0.1", cell("{:s1}", _LOOW.job_ref(job("solver.damping=0.1"), "loo.csv", _ratio)))

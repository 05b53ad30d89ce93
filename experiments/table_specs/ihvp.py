"""Section 8 of RESULTS.md (section 3's first comparison, superseded by it): IHVP error against the CG reference
across damping (runs ihvp_cnn, ihvp_resnet18, ihvp_depth): one job per solver and damping; the reference's own
relative residual says whether the error is against a valid reference. The helpers here also serve section 9
(precond.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
from tables_engine import Cell, Ref, Section, Sweep, cell, fmt

from influencelab.metric_names import metric_name

SECTION = Section("8. IHVP accuracy against CG across damping (superseded by section 3)")


def ihvp_ref(name: str, solver: str, lam: str, key: str | Callable[[pd.DataFrame], Any]) -> Ref:
    """``key`` of the job of sweep ``name`` with overrides ``solver`` and ``solver.damping=lam``."""
    return Sweep(name)(key, solver=solver, **{"solver.damping": lam})


def against_valid(key: str) -> Callable[[pd.DataFrame], Any]:
    """``key`` of the selected job, or NaN (printed –) where its reference did not converge to 0.1 (no reference)."""
    def get(df: pd.DataFrame) -> Any:
        (row,) = df.to_dict("records")
        return row[key] if row["ihvp/ref_rel_residual"] <= 0.1 else math.nan
    return get


def ref_state(df: pd.DataFrame) -> str:
    (row,) = df.to_dict("records")
    r = row["ihvp/ref_rel_residual"]
    return f"converged ({fmt(r, 'e2')})" if str(row["ihvp/ref_converged"]) == "True" else \
        f"approximate ({fmt(r, 'e2')})" if r <= 0.1 else f"**none** ({fmt(r, 'e2')})"


def ihvp_rows(name: str, dampings: Sequence[str], solvers: Sequence[str], time_at: str | None = None
              ) -> list[list[str | Cell]]:
    rows: list[list[str | Cell]] = []
    time_at = time_at or dampings[0]
    for lam in dampings:
        rows.append([f"{float(lam):g}", cell("{}", ihvp_ref(name, solvers[0], lam, ref_state)),
                     *(cell("{:.3} / {:.3}", ihvp_ref(name, s, lam, against_valid("ihvp/rel_error")),
                            ihvp_ref(name, s, lam, against_valid("ihvp/cosine"))) for s in solvers)])
    rows.append([f"time (s): fit + solve, at λ = {float(time_at):g}", "",
                 *(cell("{:s3}", ihvp_ref(name, s, time_at, "ihvp/time_s")) for s in solvers)])
    return rows


def iters_cell(name: str, solver: str, lam: str) -> Cell:
    """An iterative solver's iterations to an error of 0.1 / 0.01, its time to 0.1 and its final residual."""
    def R(key: str, valid: bool = True) -> Ref:
        return ihvp_ref(name, solver, lam, against_valid(key) if valid else key)

    return cell("{:d} / {:d} ({:s3} s); {:e2}", R("ihvp/iters_to_0.1"), R("ihvp/iters_to_0.01"),
                R("ihvp/time_s_to_0.1"), R("ihvp/rel_residual", valid=False))


IHVP_HEAD = ["λ", "CG reference (relative residual)", "EK-FAC error / cosine", "K-FAC error / cosine",
             "LiSSA (depth 200) error / cosine"]
SECTION.table("ihvp_cnn", IHVP_HEAD,
              ihvp_rows("ihvp_cnn", ["0.001", "0.01", "0.1", "1.0", "10.0"], ["ekfac", "kfac", "lissa"]),
              "8: IHVP error vs the CG reference across damping, CNN")
SECTION.table("ihvp_resnet18", IHVP_HEAD, ihvp_rows("ihvp_resnet18", ["10.0", "1.0", "0.1", "0.01", "0.001"],
                                                    ["ekfac", "kfac", "lissa"]),
              "8: IHVP error vs the CG reference across damping, reduced ResNet-18")

# LiSSA depth at λ = 1e-2 (run ihvp_depth: one job per solver.depth)
_ID = Sweep("ihvp_depth")
_DEPTHS = (25, 50, 100, 400)
SECTION.table("ihvp_depth", ["LiSSA depth", *map(str, _DEPTHS)],
              [["error vs CG", *(cell("{:.3}", _ID("ihvp/rel_error", **{"solver.depth": d})) for d in _DEPTHS)],
               ["cosine", *(cell("{:.2}", _ID("ihvp/cosine", **{"solver.depth": d})) for d in _DEPTHS)],
               ["time (s)", *(cell("{:s3}", _ID("ihvp/time_s", **{"solver.depth": d})) for d in _DEPTHS)]],
              "8: LiSSA error, cosine and time against depth at λ = 1e-2")

# ---------------------------------------------------------------------------------------------------------------
# prose numbers (RESULTS.md's text quotes them as <!-- num:NAME -->...<!-- /num -->)

# the spread over the 8 queries behind ihvp_cnn's means (run ihvp_cnn_spread: the same sweep rerun with each query's
# error recorded; its means equal ihvp_cnn's to 5 digits)


def spread_cell(solver: str, lam: str) -> Cell:
    def R(stat: str) -> Ref:
        return ihvp_ref("ihvp_cnn_spread", solver, lam, metric_name(f"ihvp/rel_error{stat}", float(lam)))
    return cell("{:.2} [{:.2}, {:.2}] ({:.2}–{:.2})", R(""), R("_ci_low"), R("_ci_high"), R("_min"), R("_max"))


SECTION.table("ihvp_cnn_spread", ["λ", "EK-FAC error: mean [95% CI] (min–max over queries)", "K-FAC error: …",
                                  "LiSSA (depth 200) error: …"],
              [[f"{float(lam):g}", *(spread_cell(s, lam) for s in ("ekfac", "kfac", "lissa"))]
               for lam in ("0.001", "0.01", "0.1", "1.0", "10.0")],
              "8: the spread over queries of the IHVP errors, CNN")


def _paired_vs_lissa(solver: str, lam: str) -> Callable[[pd.DataFrame], str]:
    """``solver``'s error minus LiSSA's, paired over the same queries (mean and 95% percentile-bootstrap interval,
    1,000 resamples, seed 0), from the two jobs' ihvp_queries.csv."""
    from tables_engine import job, load, paired_mean_ci

    def text(_: pd.DataFrame) -> str:
        S = Sweep("ihvp_cnn_spread")
        err = {s: load(S.file(f"job{S.number(job(solver=s, **{'solver.damping': lam}))}_ihvp_queries.csv"))
               .sort_values("query")["rel_error"].to_numpy() for s in (solver, "lissa")}
        d = err[solver] - err["lissa"]
        return paired_mean_ci(d)
    return text


SECTION.table("ihvp_cnn_paired", ["λ", "EK-FAC − LiSSA error, paired over queries [95% CI]",
                                  "K-FAC − LiSSA error, paired [95% CI]"],
              [[f"{float(lam):g}", *(cell("{}", Sweep("ihvp_cnn_spread").every_job(_paired_vs_lissa(s, lam)))
                                     for s in ("ekfac", "kfac"))]
               for lam in ("0.001", "0.01", "0.1", "1.0", "10.0")],
              "8: EK-FAC/K-FAC minus LiSSA, paired over queries, CNN")

# section 8's prose (runs ihvp_cnn, ihvp_cnn_spread, ihvp_depth, ihvp_resnet18)
_CNN_LAMS = ("0.001", "0.01", "0.1", "1.0", "10.0")
_R18_LAMS = ("10.0", "1.0", "0.1", "0.01", "0.001")


def _span(name: str, solver: str, lams: Sequence[str], key: str, f: str) -> Callable[[], str]:
    """"lo–hi" of ``key`` over ``solver``'s jobs of sweep ``name`` at ``lams`` (one value when all round alike)."""
    def text() -> str:
        v = [ihvp_ref(name, solver, lam, key).value() for lam in lams]
        lo, hi = fmt(min(v), f), fmt(max(v), f)
        return lo if lo == hi else f"{lo}–{hi}"
    return text


def _spread_factor() -> str:
    """"lo–hi" over λ of EK-FAC's largest over smallest error among the 8 queries (run ihvp_cnn_spread)."""
    v = [ihvp_ref("ihvp_cnn_spread", "ekfac", lam, metric_name("ihvp/rel_error_max", float(lam))).value()
         / ihvp_ref("ihvp_cnn_spread", "ekfac", lam, metric_name("ihvp/rel_error_min", float(lam))).value()
         for lam in _CNN_LAMS]
    return f"{fmt(min(v), 's2')}–{fmt(max(v), 's2')}"


SECTION.number("a_spread_factor", _spread_factor)
SECTION.number("a_lissa_error_large", _span("ihvp_cnn", "lissa", ("1.0", "10.0"), "ihvp/rel_error", ".2"))
SECTION.number("a_lissa_cosine_large", _span("ihvp_cnn", "lissa", ("1.0", "10.0"), "ihvp/cosine", ".3"))
SECTION.number("a_lissa_error_small", _span("ihvp_cnn", "lissa", ("0.001", "0.01"), "ihvp/rel_error", ".2"))
SECTION.number("a_ekfac_error_span", _span("ihvp_cnn", "ekfac", _CNN_LAMS, "ihvp/rel_error", ".2"))
SECTION.number("a_ekfac_cosine_span", _span("ihvp_cnn", "ekfac", _CNN_LAMS, "ihvp/cosine", ".2"))
SECTION.number("a_ref_residual_1e-3", cell("{:e2}", ihvp_ref("ihvp_cnn", "ekfac", "0.001", "ihvp/ref_rel_residual")))
for _s in ("ekfac", "lissa"):
    SECTION.number(f"a_{_s}_error_cos_1e-2", cell("{:.2} / {:.2}", ihvp_ref("ihvp_cnn", _s, "0.01", "ihvp/rel_error"),
                                                  ihvp_ref("ihvp_cnn", _s, "0.01", "ihvp/cosine")))
SECTION.number("a_ekfac_error_1e-2", cell("{:.2}", ihvp_ref("ihvp_cnn", "ekfac", "0.01", "ihvp/rel_error")))
SECTION.number("a_depth400_cosine", cell("{:.2}", _ID("ihvp/cosine", **{"solver.depth": 400})))
SECTION.number("a_depth400_error", cell("{:.2}", _ID("ihvp/rel_error", **{"solver.depth": 400})))
# the reduced ResNet-18
SECTION.number("a_r18_test_acc", cell("{:.3}", ihvp_ref("ihvp_resnet18", "ekfac", "10.0", "train/test_accuracy")))
SECTION.number("a_r18_train_acc", cell("{:.3}", ihvp_ref("ihvp_resnet18", "ekfac", "10.0", "train/train_accuracy")))
SECTION.number("a_r18_train_s", cell("{:d}", ihvp_ref("ihvp_resnet18", "ekfac", "10.0", "time/train_s")))
for _s in ("ekfac", "kfac"):
    SECTION.number(f"a_r18_{_s}_fit_s", cell("{:d}", ihvp_ref("ihvp_resnet18", _s, "10.0", "fit/compute_s")))
SECTION.number("a_r18_lissa_time_span", _span("ihvp_resnet18", "lissa", _R18_LAMS, "ihvp/time_s", "d"))
SECTION.number("a_r18_ref_residual_1", cell("{:e2}", ihvp_ref("ihvp_resnet18", "ekfac", "1.0", "ihvp/ref_rel_residual")))
SECTION.number("a_r18_ref_residual_small", _span("ihvp_resnet18", "ekfac", ("0.1", "0.01", "0.001"),
                                                 "ihvp/ref_rel_residual", "s2"))
for _lam, _tag in (("10.0", "10"), ("1.0", "1")):
    SECTION.number(f"a_r18_lissa_error_cos_{_tag}", cell("{:.2} / {:.2}",
                                                         ihvp_ref("ihvp_resnet18", "lissa", _lam, "ihvp/rel_error"),
                                                         ihvp_ref("ihvp_resnet18", "lissa", _lam, "ihvp/cosine")))
SECTION.number("a_r18_ekfac_cosine", _span("ihvp_resnet18", "ekfac", ("10.0", "1.0"), "ihvp/cosine", ".2"))

"""Section 3's exact-reference part (issue 29): every solver's IHVP error and the rank agreement of its pairwise
scores against solver=gram (exact at every damping), per damping: the median over the queries, from the files
``experiments/sec62_figure.py`` writes beside its figures (``experiments/results/sec62/<setting>.csv``: per series
and damping the median and quartiles of the error and of the Spearman correlation, and the reference's residual;
each series one job of a committed sweep per damping, named in the file's ``source`` column)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import pandas as pd
from tables_engine import ROOT, Cell, Ref, Section, Sweep, cell, fmt, job

SECTION = Section("3. IHVP accuracy against an exact reference at every damping")


def src(setting: str) -> str:
    return f"experiments/results/sec62/{setting}.csv"


def value(setting: str, series: str, lam: str, key: str) -> Ref:
    return Ref(src(setting), key, (("series", series), ("damping", lam)), one=True)


def worst_residual(setting: str, lam: str) -> Ref:
    """The reference's relative residual at ``lam`` (the same reference serves every series: the largest)."""
    def get(df: pd.DataFrame) -> str:
        return fmt(df["ref_rel_residual"].max(), "e2")
    return Ref(src(setting), get, (("damping", lam),))


def _has(setting: str, series: str, lam: str) -> bool:
    """Whether ``series`` ran at ``lam`` (a series whose dampings ran as sweeps of their own may lack some)."""
    from tables_engine import exists, load
    if not exists(src(setting)):
        return True  # (the spec's own check reports the missing file)
    df = load(src(setting))
    return bool(((df["series"] == series) & (df["damping"].astype(float) == float(lam))).any())


# the sweep whose trained model a setting's table is about (its EK-FAC and K-FAC jobs): a series that ran on a model
# with other training metrics (the same config trained on another machine's CPU: the cached model did not travel)
# is marked "†" in the tables
MODEL_OF = {"cnn": "ihvp_cnn_exact", "resnet18": "ihvp_resnet18_exact", "cnn_ladder": "ihvp_cnn_exact",
            "resnet18_1k": "ihvp_resnet18_1k_exact", "resnet18_ladder": "ihvp_resnet18_exact"}
OTHER_MODEL = "†"


def _model(sweep: str) -> tuple[float, float]:
    """A sweep's trained model, as its first job's test accuracy and training loss (what the train stage logged)."""
    from tables_engine import load
    df = load(f"experiments/results/{sweep}/report.csv")
    return float(df["train/test_accuracy"].iloc[0]), float(df["train/train_loss"].iloc[0])


def _same_model(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """The same model: equal test accuracy and training loss equal to 1e-4 (a cached model's loss, evaluated again
    by later code, differs in the 7th digit)."""
    return a[0] == b[0] and math.isclose(a[1], b[1], rel_tol=1e-4)


def other_model(setting: str, series: str, lam: str) -> bool:
    """Whether ``series`` at ``lam`` ran on another model than the setting's (see ``MODEL_OF``)."""
    if setting not in MODEL_OF or (source := _source(setting, series, lam)) is None:
        return False
    return not _same_model(_model(source.split("/")[0]), _model(MODEL_OF[setting]))


def _source(setting: str, series: str, lam: str) -> str | None:
    """``SWEEP/jobN``: the job the setting's CSV took ``series`` at ``lam`` from (None: no such row, or no CSV)."""
    from tables_engine import exists, load
    if not exists(src(setting)):
        return None
    df = load(src(setting))
    got = df[(df["series"] == series) & (df["damping"].astype(float) == float(lam))]["source"]
    return str(got.iloc[0]) if len(got) else None


def mark(setting: str, series: str, lam: str) -> str:
    """`` †`` after a cell of ``series`` at ``lam`` that ran on another model (:func:`other_model`), else nothing."""
    return f" {OTHER_MODEL}" if other_model(setting, series, lam) else ""


def solver_residual(setting: str, series: str, lam: str) -> Ref | None:
    """An iterative series' own relative residual at ``lam`` (on its training points, from the job's ihvp.csv that
    the setting's CSV names as its source), or None for a direct solver or a missing file."""
    from tables_engine import exists, load
    if (source := _source(setting, series, lam)) is None:
        return None
    sweep, job = source.split("/")
    path = f"experiments/results/{sweep}/{job}_ihvp.csv"
    if not exists(path):
        return None
    d = load(path)
    d = d[d["damping"].astype(float) == float(lam)]
    # (solver=gram is direct: its "iterations" are refinement steps, its residual the reference's kind)
    if not len(d) or d["solver"].iloc[0] == "gram" or not float(d["iterations"].iloc[0]) > 0:
        return None
    return Ref(path, "rel_residual", (("damping", lam),), one=True)


def _cell(setting: str, s: str, lam: str) -> Cell:
    """``error / ρ``, with an iterative solver's own residual (``res``: it is converged only where that is small)."""
    res = solver_residual(setting, s, lam)
    refs = (value(setting, s, lam, "error_median"), value(setting, s, lam, "spearman_median"))
    return cell("{:.2} / {:.2}" + (" (res {:e2})" if res is not None else "") + mark(setting, s, lam),
                *refs, *((res,) if res is not None else ()))


def rows(setting: str, series: Sequence[str], dampings: Sequence[str]) -> list[list[str | Cell | Ref]]:
    return [[f"{float(lam):g}", worst_residual(setting, lam),
             *(_cell(setting, s, lam) if _has(setting, s, lam) else "not run" for s in series)] for lam in dampings]


def table(name: str, setting: str, series: Sequence[str], dampings: Sequence[str], note: str) -> None:
    SECTION.table(name, ["λ", "reference residual (worst query)", *(f"{s}: error / ρ" for s in series)],
                  rows(setting, series, dampings), note)


def median(setting: str, series: str, lam: str, key: str = "error_median", f: str = ".2") -> Cell:
    return cell("{:" + f + "}", value(setting, series, lam, key))


def span(setting: str, series: str, key: str, f: str = ".2", dampings: Sequence[str] | None = None) -> Ref:
    """``lo–hi``: the range over the dampings (all, or those given) of one series' median ``key``."""
    def get(df: pd.DataFrame) -> str:
        if dampings is not None:
            df = df[df["damping"].astype(float).isin([float(d) for d in dampings])]
        lo, hi = fmt(df[key].min(), f), fmt(df[key].max(), f)
        return lo if lo == hi else f"{lo}–{hi}"
    return Ref(src(setting), get, (("series", series),))


def worst_overall(setting: str, dampings: Sequence[str] | None = None) -> Ref:
    """The reference's largest residual over the dampings (all, or those given)."""
    def get(df: pd.DataFrame) -> str:
        if dampings is not None:
            df = df[df["damping"].astype(float).isin([float(d) for d in dampings])]
        return fmt(df["ref_rel_residual"].max(), "e2")
    return Ref(src(setting), get)


def _has_any(setting: str, lam: str) -> bool:
    """Whether any series of ``setting`` ran at ``lam``."""
    from tables_engine import load
    return bool((load(src(setting))["damping"].astype(float) == float(lam)).any())


def _present(setting: str, series: Sequence[str]) -> list[str]:
    from tables_engine import exists, load
    if not exists(src(setting)):
        return []
    have = set(load(src(setting))["series"])
    return [s for s in series if s in have]


CNN_DAMPINGS = ("1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1", "1.0", "10.0")
# the reduced ResNet-18: the three small dampings on the setting's model; λ = 0.1, 1, 10 (run
# ihvp_resnet18_exact_large and the sweeps beside it) later, on the † model, as rows of the same table and figure
R18_SMALL = ("1e-06", "0.0001", "0.01")
R18_LARGE = ("0.1", "1.0", "10.0")
R18_DAMPINGS = R18_SMALL + tuple(lam for lam in R18_LARGE
                                 if (ROOT / src("resnet18")).exists() and _has_any("resnet18", lam))
CNN_SERIES = ("EK-FAC", "K-FAC", "LiSSA (tuned)", "LiSSA+EK-FAC (tuned)", "CG+EK-FAC (30 it.)", "Arnoldi 50, dropped",
              "Arnoldi 200, dropped", "Arnoldi 200, λ elsewhere")
R18_SERIES = ("EK-FAC", "K-FAC", "Arnoldi 50, λ elsewhere", "LiSSA (tuned)", "CG+EK-FAC (30 it.)",
              "LiSSA+EK-FAC (tuned)")
table("ihvp_exact_cnn", "cnn", _present("cnn", CNN_SERIES), CNN_DAMPINGS,
      "3.0: IHVP error and score Spearman against the exact reference, CNN (medians over 16 queries)")

# prose numbers
SECTION.number("x_cnn_ref_worst", cell("{}", worst_overall("cnn")))
SECTION.number("x_r18_ref_1e-6", cell("{}", worst_overall("resnet18", ["1e-06"])))
SECTION.number("x_r18_ref_rest", cell("{}", worst_overall("resnet18", ["0.0001", "0.01"])))
SECTION.number("x_cnn_ekfac_err_span", cell("{}", span("cnn", "EK-FAC", "error_median")))
SECTION.number("x_cnn_ekfac_rho_small", cell("{}", Ref(src("cnn"), lambda df: (
    f"{fmt(df[df['damping'] <= 0.01]['spearman_median'].min(), '.2')}–"
    f"{fmt(df[df['damping'] <= 0.01]['spearman_median'].max(), '.2')}"), (("series", "EK-FAC"),))))
SECTION.number("x_cnn_ekfac_rho_10", median("cnn", "EK-FAC", "10.0", "spearman_median"))
SECTION.number("x_cnn_kfac_rho_small", cell("{}", Ref(src("cnn"), lambda df: (
    f"{fmt(df[df['damping'] <= 0.01]['spearman_median'].min(), '.2')}–"
    f"{fmt(df[df['damping'] <= 0.01]['spearman_median'].max(), '.2')}"), (("series", "K-FAC"),))))
SECTION.number("x_cnn_a200_rho_1e-4", median("cnn", "Arnoldi 200, λ elsewhere", "0.0001", "spearman_median"))
SECTION.number("x_cnn_a200_rho_1e-2", median("cnn", "Arnoldi 200, λ elsewhere", "0.01", "spearman_median"))
SECTION.number("x_cnn_a200_err_1e-6", median("cnn", "Arnoldi 200, λ elsewhere", "1e-06"))
SECTION.number("x_cnn_a200_err_0.1", median("cnn", "Arnoldi 200, λ elsewhere", "0.1", f=".3"))
SECTION.number("x_cnn_a50d_err_small", cell("{}", Ref(src("cnn"), lambda df: fmt(
    df[df["damping"] <= 0.01]["error_median"].min(), ".2"), (("series", "Arnoldi 50, dropped"),))))
SECTION.number("x_r18_ekfac_err_span", cell("{}", span("resnet18", "EK-FAC", "error_median", dampings=R18_SMALL)))
SECTION.number("x_r18_ekfac_rho_span", cell("{}", span("resnet18", "EK-FAC", "spearman_median", dampings=R18_SMALL)))
SECTION.number("x_r18_kfac_rho_span", cell("{}", span("resnet18", "K-FAC", "spearman_median", dampings=R18_SMALL)))
SECTION.number("x_r18_ekfac_cos_span", cell("{}", Ref("experiments/results/ihvp_resnet18_exact/report_by_damping.csv",
                                                      lambda df: f"{fmt(df[df['solver'] == 'ekfac']['ihvp/cosine'].min(), '.2')}–"
                                                                 f"{fmt(df[df['solver'] == 'ekfac']['ihvp/cosine'].max(), '.2')}")))


# the approximation ladder (issue 29 item 5): experiments/results/sec62/cnn_ladder.csv (series present in it)
LADDER = ("exact block-diagonal", "K-FAC", "EK-FAC", "EK-FAC, 10 Fisher samples", "K-FAC, 10 Fisher samples",
          "exact, empirical Fisher", "EK-FAC, empirical Fisher", "EK-FAC on 50 points", "EK-FAC on 150 points")


table("ihvp_exact_resnet18", "resnet18", _present("resnet18", R18_SERIES), R18_DAMPINGS,
      "3.0: the same on the reduced ResNet-18 (the series whose sweeps have run)")

LADDER_PRESENT = _present("cnn_ladder", LADDER)
LADDER_DAMPINGS = ("1e-06", "0.0001", "0.01", "1.0")
table("ihvp_exact_ladder", "cnn_ladder", LADDER_PRESENT, LADDER_DAMPINGS,
      "3.0: the approximation ladder on the CNN, each step against the exact GGN inverse")


def _small(setting: str, series: str, key: str) -> Ref:
    """``lo–hi`` of one series' median ``key`` over λ ≤ 1e-2."""
    def get(df: pd.DataFrame) -> str:
        v = df[df["damping"].astype(float) <= 0.01][key]
        return f"{fmt(v.min(), '.2')}–{fmt(v.max(), '.2')}"
    return Ref(src(setting), get, (("series", series),))


for _s, _tag in (("exact block-diagonal", "bd"), ("EK-FAC, 10 Fisher samples", "ek10"),
                 ("EK-FAC, empirical Fisher", "ekef"), ("exact, empirical Fisher", "exef"), ("K-FAC", "kfac"),
                 ("EK-FAC", "ekfac")):
    if _s in LADDER_PRESENT:
        SECTION.number(f"x_ladder_{_tag}_rho_small", cell("{}", _small("cnn_ladder", _s, "spearman_median")))
SECTION.number("x_ladder_bd_err_small", cell("{}", _small("cnn_ladder", "exact block-diagonal", "error_median")))
if "EK-FAC on 50 points" in LADDER_PRESENT:
    SECTION.number("x_ladder_p50_err_1e-6", median("cnn_ladder", "EK-FAC on 50 points", "1e-06"))
    SECTION.number("x_ladder_p150_err_1e-6", median("cnn_ladder", "EK-FAC on 150 points", "1e-06"))
    SECTION.number("x_ladder_ekfac_err_1e-6", median("cnn_ladder", "EK-FAC", "1e-06"))
    SECTION.number("x_ladder_p50_rho_small", cell("{}", _small("cnn_ladder", "EK-FAC on 50 points", "spearman_median")))

SECTION.number("x_cnn_lissa_err_small", cell("{}", _small("cnn", "LiSSA (tuned)", "error_median")))
SECTION.number("x_cnn_lissa_rho_small", cell("{}", _small("cnn", "LiSSA (tuned)", "spearman_median")))
SECTION.number("x_cnn_lissa_err_1", median("cnn", "LiSSA (tuned)", "1.0"))
SECTION.number("x_cnn_lissa_time", cell("{}", Ref("experiments/results/ihvp_cnn_exact_lissa/job0_ihvp.csv", lambda df: (
    f"{fmt(df['time_s'].min(), 's3')}–{fmt(df['time_s'].max(), 's3')}"))))
SECTION.number("x_cnn_ekfac_time", cell("{}", Ref("experiments/results/ihvp_cnn_exact/job0_ihvp.csv", lambda df: (
    fmt(df['fit_s'].iloc[0], 's3')))))
SECTION.number("x_cnn_lissa_res", cell("{}", Ref("experiments/results/ihvp_cnn_exact_lissa/job0_ihvp.csv", lambda df: (
    f"{fmt(df['rel_residual'].min(), '.2')}–{fmt(df['rel_residual'].max(), '.2')}"))))


# the time-matched comparison (issue 29 item 3): experiments/results/sec62/resnet18_time_matched.csv
TM = "experiments/results/sec62/resnet18_time_matched.csv"


def _ran(df: pd.DataFrame, series: str, lam: str) -> bool:
    return bool(((df["series"] == series) & (df["damping"].astype(float) == float(lam))
                 & (df["budget_of"] == "EK-FAC")).any())


def _tm_rows() -> list[list[str | Cell | Ref]]:
    from tables_engine import exists, load
    if not exists(TM):
        return []
    df = load(TM)
    series = [s for s in R18_SERIES if s in set(df["series"])]
    out: list[list[str | Cell | Ref]] = []
    for lam in R18_DAMPINGS:
        if not _ran(df, "EK-FAC", lam):
            continue
        w = (("damping", lam), ("budget_of", "EK-FAC"))

        def other(s: str, lam: str = lam) -> bool:  # (a cell on another model than the budget's EK-FAC: not matched)
            return other_model("resnet18", s, lam) != other_model("resnet18", "EK-FAC", lam)
        out.append([f"{float(lam):g}", cell("{:s3}", Ref(TM, "budget_s", (*w, ("series", "EK-FAC")), one=True)),
                    *(("other model" if other(s) else
                       cell("{:.2}" + mark("resnet18", s, lam), Ref(TM, "rel_error_at_budget", (*w, ("series", s)), one=True)))
                      if _ran(df, s, lam) else "not run" for s in series),
                    *(("other model" if other(s) else
                       cell("{:s3}" + mark("resnet18", s, lam), Ref(TM, "time_to_budget_error_s", (*w, ("series", s)), one=True)))
                      if _ran(df, s, lam) else "not run"
                      for s in series if bool(df[df["series"] == s]["iterative"].iloc[0]))])
    return out


def _tm_header() -> list[str]:
    from tables_engine import exists, load
    if not exists(TM):
        return ["λ"]
    df = load(TM)
    series = [s for s in R18_SERIES if s in set(df["series"])]
    it = [s for s in series if bool(df[df["series"] == s]["iterative"].iloc[0])]
    return ["λ", "EK-FAC's time (s)", *(f"{s}: error then" for s in series), *(f"{s}: s to EK-FAC's error" for s in it)]


SECTION.table("ihvp_exact_r18_time_matched", _tm_header(), _tm_rows,
              "3.0: the error each solver has when EK-FAC (fit + solve) has finished, ResNet-18")


def _first(job: str, col: str, f: str) -> Cell:
    """``col`` of the one row of a single-damping sweep's ``job0_ihvp.csv``, formatted with ``f``."""
    return cell("{}", Ref(job, lambda df: fmt(df[col].iloc[0], f)))


def _tm_value(lam: str, series: str, key: str) -> Ref:
    return Ref(TM, key, (("damping", lam), ("budget_of", "EK-FAC"), ("series", series)), one=True)


# at λ ≥ 0.1 (the † model): EK-FAC's fit + solve time there (lo–hi), and when each iterative solver first reached
# EK-FAC's (mean) error, where it did
if (ROOT / TM).exists():
    from tables_engine import load
    _tm = load(TM)
    _tm_large = [lam for lam in R18_LARGE if _ran(_tm, "EK-FAC", lam)]
    if _tm_large:
        def _ek_times(df: pd.DataFrame) -> str:
            t = df[df["damping"].isin([float(lam) for lam in _tm_large])]["budget_s"]
            return f"{fmt(t.min(), 's3')}–{fmt(t.max(), 's3')}"
        SECTION.number("x_r18L_tm_ekfac_s", cell("{}", Ref(TM, _ek_times, (("budget_of", "EK-FAC"),
                                                                          ("series", "EK-FAC")))))
    for _lam in _tm_large:
        for _s, _tag in (("LiSSA (tuned)", "lissa"), ("CG+EK-FAC (30 it.)", "cgek"), ("LiSSA+EK-FAC (tuned)", "lek")):
            _t = _tm[(_tm["series"] == _s) & (_tm["damping"] == float(_lam)) & (_tm["budget_of"] == "EK-FAC")]
            if len(_t) and math.isfinite(float(_t["time_to_budget_error_s"].iloc[0])):
                SECTION.number(f"x_r18L_tm_{_tag}_s_{float(_lam):g}",
                               cell("{:s3}", _tm_value(_lam, _s, "time_to_budget_error_s")))


if "Arnoldi 50, λ elsewhere" in _present("resnet18", R18_SERIES):
    SECTION.number("x_r18_arnoldi_err_span", cell("{}", span("resnet18", "Arnoldi 50, λ elsewhere", "error_median",
                                                             dampings=R18_SMALL)))
    SECTION.number("x_r18_arnoldi_rho_span", cell("{}", span("resnet18", "Arnoldi 50, λ elsewhere",
                                                             "spearman_median", dampings=R18_SMALL)))
    SECTION.number("x_r18_arnoldi_fit", cell("{}", Ref("experiments/results/ihvp_resnet18_exact_arnoldi/job0_ihvp.csv",
                                                       lambda df: fmt(df["fit_s"].iloc[0], "s3"))))

# tuned LiSSA and LiSSA + EK-FAC on ResNet-18, one sweep per damping (run ihvp_resnet18_exact_<sweep>_<λ>): each
# one's numbers once it ran (with EK-FAC's at that damping beside LiSSA's)
for _sweep, _series, _lab in (("lissa", "LiSSA (tuned)", "lissa"), ("lissa_ekfac", "LiSSA+EK-FAC (tuned)", "lek")):
    for _tag, _lam in (("1e-6", "1e-06"), ("1e-4", "0.0001"), ("1e-2", "0.01"), ("0.1", "0.1"), ("1", "1.0"),
                       ("10", "10.0")):
        _job = f"experiments/results/ihvp_resnet18_exact_{_sweep}_{_tag}/job0_ihvp.csv"
        if not (ROOT / _job).exists():
            continue
        SECTION.number(f"x_r18_{_lab}_err_{_tag}", median("resnet18", _series, _lam))
        SECTION.number(f"x_r18_{_lab}_rho_{_tag}", median("resnet18", _series, _lam, "spearman_median"))
        SECTION.number(f"x_r18_{_lab}_res_{_tag}", _first(_job, "rel_residual", ".2"))
        SECTION.number(f"x_r18_{_lab}_time_{_tag}", _first(_job, "time_s", "s3"))
        # the rule applied (scale search, depth, repeats), where the sweep's report has it (the ihvp stage logs it
        # since 2026-12-06: earlier sweeps' rule is in the prose only)
        _rep = _job.replace("job0_ihvp.csv", "report.csv")
        _rule = f"solver/rule@{float(_lam):g}"
        if _rule in pd.read_csv(ROOT / _rep, nrows=0).columns:
            SECTION.number(f"x_r18_{_lab}_rule_{_tag}", cell("{}", Ref(_rep, lambda df, c=_rule: str(df[c].iloc[0]))))
        if _sweep == "lissa" and _lam in R18_SMALL:  # (EK-FAC at λ ≥ 0.1: the x_r18L_ numbers below)
            SECTION.number(f"x_r18_ekfac_err_{_tag}", median("resnet18", "EK-FAC", _lam))
            SECTION.number(f"x_r18_ekfac_rho_{_tag}", median("resnet18", "EK-FAC", _lam, "spearman_median"))


# λ = 0.1, 1, 10 on the reduced ResNet-18 (run ihvp_resnet18_exact_large, ..._large_arnoldi, ihvp_resnet18_exact_cg_ekfac_<λ>; the
# † model; tuned LiSSA's ..._lissa_<λ> in the loop above): the reference's worst residual there, and the medians the
# prose quotes, where their series ran
_LARGE_RAN = [lam for lam in R18_LARGE if lam in R18_DAMPINGS]
_QUOTED_LARGE = (("EK-FAC", "ekfac", R18_LARGE), ("K-FAC", "kfac", ("10.0",)),
                 ("Arnoldi 50, λ elsewhere", "arn", ("1.0", "10.0")), ("CG+EK-FAC (30 it.)", "cgek", R18_LARGE))
if _LARGE_RAN:
    SECTION.number("x_r18_ref_large", cell("{}", worst_overall("resnet18", _LARGE_RAN)))
    for _s, _tag, _lams in _QUOTED_LARGE:
        for _lam in _lams:
            if _lam in _LARGE_RAN and _s in _present("resnet18", R18_SERIES) and _has("resnet18", _s, _lam):
                SECTION.number(f"x_r18L_{_tag}_err_{float(_lam):g}", median("resnet18", _s, _lam))
                SECTION.number(f"x_r18L_{_tag}_rho_{float(_lam):g}", median("resnet18", _s, _lam, "spearman_median"))


def _paired_vs_lissa(ekfac: str, lissa: str, lam: str, key: str = "rel_error") -> Ref:
    """EK-FAC's error (or another per-query ``key``) minus tuned LiSSA's at ``lam``, paired over the same queries (mean
    and 95% percentile-bootstrap interval, 1,000 resamples, seed 0), from the two jobs' ihvp_queries.csv (``ekfac``
    has every damping, ``lissa`` at least ``lam``)."""
    from tables_engine import load, paired_mean_ci

    def text(ek: pd.DataFrame) -> str:
        a = ek[ek["damping"] == float(lam)].sort_values("query")
        b = load(lissa)
        b = b[b["damping"] == float(lam)].sort_values("query")
        if a.empty or a["query"].tolist() != b["query"].tolist():
            raise LookupError(f"{lissa}: not the queries of {ekfac} at damping {lam}")
        return paired_mean_ci(a[key].to_numpy() - b[key].to_numpy())
    return Ref(ekfac, text, via=(lissa,))


# ResNet-18 at λ ≥ 0.1 (the † model): run ihvp_resnet18_exact_large's EK-FAC job against run
# ihvp_resnet18_exact_lissa_<λ>
for _lam in _LARGE_RAN:
    _lissa = f"experiments/results/ihvp_resnet18_exact_lissa_{float(_lam):g}/job0_ihvp_queries.csv"
    if (ROOT / _lissa).exists():
        SECTION.number(f"x_r18L_ekfac_minus_lissa_{float(_lam):g}", cell("{}", _paired_vs_lissa(
            "experiments/results/ihvp_resnet18_exact_large/job0_ihvp_queries.csv", _lissa, _lam)))
# the CNN at every damping: run ihvp_cnn_exact's EK-FAC job against run ihvp_cnn_exact_lissa
for _lam in ("1e-06", "0.0001", "0.01", "0.1", "1.0", "10.0"):
    SECTION.number(f"x_cnn_ekfac_minus_lissa_{float(_lam):g}", cell("{}", _paired_vs_lissa(
        "experiments/results/ihvp_cnn_exact/job0_ihvp_queries.csv",
        "experiments/results/ihvp_cnn_exact_lissa/job0_ihvp_queries.csv", _lam)))
SECTION.number("x_cnn_lissa_err_span", cell("{}", span("cnn", "LiSSA (tuned)", "error_median")))
SECTION.number("x_cnn_lissa_err_large", cell("{}", span("cnn", "LiSSA (tuned)", "error_median",
                                                        dampings=("1.0", "10.0"))))


# EK-FAC-preconditioned CG (30 iterations) and tuned LiSSA on the CNN (run ihvp_cnn_exact_cg_ekfac, ..._lissa_ekfac)
_CGEK, _LEK = "CG+EK-FAC (30 it.)", "LiSSA+EK-FAC (tuned)"
for _lab, _ser in (("cgek", _CGEK), ("lek", _LEK)):
    for _lam, _tag in (("1e-06", "1e-6"), ("0.0001", "1e-4"), ("0.01", "1e-2")):
        SECTION.number(f"x_cnn_{_lab}_err_{_tag}", median("cnn", _ser, _lam))
        SECTION.number(f"x_cnn_{_lab}_rho_{_tag}", median("cnn", _ser, _lam, "spearman_median"))


def _job_span(sweep: str, col: str, f: str = ".2", below: float = math.inf) -> Ref:
    """"min–max" of ``col`` over the damping rows (λ < ``below``) of a sweep's job0_ihvp.csv."""
    def get(df: pd.DataFrame) -> str:
        v = df[df["damping"] < below][col]
        return f"{fmt(v.min(), f)}–{fmt(v.max(), f)}"
    return Ref(f"experiments/results/{sweep}/job0_ihvp.csv", get)


SECTION.number("x_cnn_cgek_res", cell("{}", _job_span("ihvp_cnn_exact_cg_ekfac", "rel_residual", "e2", below=1)))
SECTION.number("x_cnn_cgek_time", cell("{}", _job_span("ihvp_cnn_exact_cg_ekfac", "time_s", ".0")))
SECTION.number("x_cnn_lek_res", cell("{}", _job_span("ihvp_cnn_exact_lissa_ekfac", "rel_residual", "e2", below=1)))
SECTION.number("x_cnn_lek_time", cell("{}", _job_span("ihvp_cnn_exact_lissa_ekfac", "time_s", ".0")))
SECTION.number("x_cnn_ekfac_err_1e-4", median("cnn", "EK-FAC", "0.0001"))
SECTION.number("x_cnn_ekfac_rho_1e-4", median("cnn", "EK-FAC", "0.0001", "spearman_median"))

# CG + EK-FAC on the reduced ResNet-18 (run ihvp_resnet18_exact_cg_ekfac)
for _lam, _tag in (("1e-06", "1e-6"), ("0.0001", "1e-4"), ("0.01", "1e-2")):
    SECTION.number(f"x_r18_cgek_err_{_tag}", median("resnet18", _CGEK, _lam))
    SECTION.number(f"x_r18_cgek_rho_{_tag}", median("resnet18", _CGEK, _lam, "spearman_median"))
SECTION.number("x_r18_cgek_res", cell("{}", _job_span("ihvp_resnet18_exact_cg_ekfac", "rel_residual", "e2")))
SECTION.number("x_r18_cgek_time", cell("{}", _job_span("ihvp_resnet18_exact_cg_ekfac", "time_s", ",0")))
# ... and at λ = 10, 1, 0.1 (the † model), one sweep per damping (run ihvp_resnet18_exact_cg_ekfac_<λ>): its residual
# on the 256 points and its time, once it ran (its error and Spearman: the x_r18L_cgek_ numbers above)
for _lam in R18_LARGE:
    _job = f"experiments/results/ihvp_resnet18_exact_cg_ekfac_{float(_lam):g}/job0_ihvp.csv"
    if (ROOT / _job).exists():
        SECTION.number(f"x_r18L_cgek_res_{float(_lam):g}", _first(_job, "rel_residual", ".2"))
        SECTION.number(f"x_r18L_cgek_time_{float(_lam):g}", _first(_job, "time_s", "s3"))


# the ladder's first step on the reduced ResNet-18 (run ihvp_resnet18_ladder_blockdiag): experiments/results/sec62/resnet18_ladder.csv
R18_LADDER = ("exact block-diagonal", "K-FAC", "EK-FAC")
R18_LADDER_DAMPINGS = R18_SMALL + tuple(lam for lam in R18_LARGE if (ROOT / src("resnet18_ladder")).exists()
                                       and _has("resnet18_ladder", "exact block-diagonal", lam))
table("ihvp_exact_ladder_r18", "resnet18_ladder", _present("resnet18_ladder", R18_LADDER), R18_LADDER_DAMPINGS,
      "3.0: the approximation ladder on the reduced ResNet-18 (exact GGN = the reference)")
for _lam, _tag in (("1e-06", "1e-6"), ("0.01", "1e-2")):
    SECTION.number(f"x_r18_bd_err_{_tag}", median("resnet18_ladder", "exact block-diagonal", _lam))
SECTION.number("x_r18_bd_rho_span", cell("{}", span("resnet18_ladder", "exact block-diagonal", "spearman_median",
                                                   dampings=R18_SMALL)))
for _lam in R18_LADDER_DAMPINGS[len(R18_SMALL):]:  # λ ≥ 0.1 (the † model)
    SECTION.number(f"x_r18L_bd_err_{float(_lam):g}", median("resnet18_ladder", "exact block-diagonal", _lam))

# EK-FAC and K-FAC at 1e-6 on the model that a series marked † ran on (run ihvp_resnet18_retrained_1e-6), beside the
# two models' training metrics: how far the retrained model moves the comparators
_RT = Sweep("ihvp_resnet18_retrained_1e-6")
if (ROOT / _RT.report).exists():
    for _solver in ("ekfac", "kfac"):
        for _col, _key in (("err", "rel_error"), ("rho", "spearman")):
            SECTION.number(f"x_r18_rt_{_solver}_{_col}", cell("{}", _RT.job_ref(
                job(solver=_solver), "ihvp_queries.csv", lambda df, k=_key: fmt(df[k].median(), ".2"))))
    SECTION.number("x_r18_rt_ref", cell("{}", _RT.job_ref(job(solver="ekfac"), "ihvp.csv",
                                                       lambda df: fmt(df["ref_rel_residual"].max(), "e2"))))
    SECTION.number("x_r18_kfac_err_1e-6", median("resnet18", "K-FAC", "1e-06"))
    SECTION.number("x_r18_kfac_rho_1e-6", median("resnet18", "K-FAC", "1e-06", "spearman_median"))
    for _tag, _sw in (("rt", _RT), ("orig", Sweep(MODEL_OF["resnet18"]))):
        SECTION.number(f"x_r18_{_tag}_test_acc", cell("{:.3}", _sw("train/test_accuracy", solver="ekfac")))
        SECTION.number(f"x_r18_{_tag}_train_loss", cell("{:.3}", _sw("train/train_loss", solver="ekfac")))

# the converse at λ = 0.1 (run ihvp_resnet18_original_0.1): EK-FAC and K-FAC on the setting's model, which LiSSA +
# EK-FAC's λ = 0.1 cell ran on while the rest of that row is † -- its comparators on one model and one machine: their
# medians, EK-FAC's time (fit + solve) there, EK-FAC − LiSSA+EK-FAC paired over the queries, and when LiSSA + EK-FAC's
# running average first reached that EK-FAC's mean error (its trace)
_OR = Sweep("ihvp_resnet18_original_0.1")
_LEK01 = "experiments/results/ihvp_resnet18_exact_lissa_ekfac_0.1"
if (ROOT / _OR.report).exists() and (ROOT / _LEK01 / "job0_ihvp_trace.csv").exists():
    SECTION.number("x_r18_or_ref", cell("{}", _OR.job_ref(job(solver="ekfac"), "ihvp.csv",
                                                       lambda df: fmt(df["ref_rel_residual"].max(), "e2"))))
    SECTION.number("x_r18_or_ekfac_s", cell("{}", _OR.job_ref(job(solver="ekfac"), "ihvp.csv",
                                                           lambda df: fmt(df["time_s"].iloc[0], "s3"))))
    SECTION.number("x_r18_or_test_acc", cell("{:.3}", Ref(f"{_LEK01}/report.csv", "train/test_accuracy", one=True)))
    for _col, _key in (("", "rel_error"), ("_rho", "spearman")):
        SECTION.number(f"x_r18_or_ekfac_minus_lek{_col}", cell("{}", _paired_vs_lissa(
            f"{_OR.dir}/job{_OR.number(job(solver='ekfac'))}_ihvp_queries.csv", f"{_LEK01}/job0_ihvp_queries.csv", "0.1",
            _key)))

# λ = 0.1 with every solver on the setting's model and one machine (2026-12-07): the sweeps above and
# run ihvp_resnet18_original_<solver>_0.1; the time-matched columns from experiments/results/sec62/
# resnet18_original_0.1_time_matched.csv (bash experiments/sec62.sh)
TM01 = "experiments/results/sec62/resnet18_original_0.1_time_matched.csv"
_R01 = "experiments/results"
SETTING_01 = (("EK-FAC", f"{_R01}/ihvp_resnet18_original_0.1", "ekfac"),
              ("K-FAC", f"{_R01}/ihvp_resnet18_original_0.1", "kfac"),
              ("Arnoldi 50, λ elsewhere", f"{_R01}/ihvp_resnet18_original_arnoldi_0.1", None),
              ("LiSSA (tuned)", f"{_R01}/ihvp_resnet18_original_lissa_0.1", None),
              ("CG+EK-FAC (30 it.)", f"{_R01}/ihvp_resnet18_original_cg_ekfac_0.1", None),
              ("LiSSA+EK-FAC (tuned)", _LEK01, None))


def _job_file(sweep_dir: str, solver: str | None, suffix: str) -> str:
    """``job<N>_<suffix>`` of the sweep's job with ``solver`` (None: its one job, 0)."""
    n = 0 if solver is None else Sweep(sweep_dir.rsplit("/", 1)[1]).number(job(solver=solver))
    return f"{sweep_dir}/job{n}_{suffix}"


def _quartiles(key: str) -> Callable[[pd.DataFrame], str]:
    return lambda df: (f"{fmt(df[key].median(), '.2')} [{fmt(df[key].quantile(0.25), '.2')}, "
                       f"{fmt(df[key].quantile(0.75), '.2')}]")


def _reached(df: pd.DataFrame) -> str:
    """An iterative solver's seconds to EK-FAC's mean error, or "never" (not within its run)."""
    t = float(df["time_to_budget_error_s"].iloc[0])
    return fmt(t, "s3") if math.isfinite(t) else "never"


def _setting01_rows() -> list[list[str | Cell | Ref]]:
    from tables_engine import exists, load
    out: list[list[str | Cell | Ref]] = []
    tm = load(TM01) if exists(TM01) else None
    for label, sweep_dir, solver in SETTING_01:
        if not exists(f"{sweep_dir}/report.csv"):
            out.append([label, "not run", "", "", "", "", ""])
            continue
        q, row = _job_file(sweep_dir, solver, "ihvp_queries.csv"), _job_file(sweep_dir, solver, "ihvp.csv")
        res = load(row)["rel_residual"]
        w = (("budget_of", "EK-FAC"), ("series", label))
        iterative = tm is not None and bool(tm[tm["series"] == label]["iterative"].iloc[0])
        out.append([label, cell("{}", Ref(q, _quartiles("rel_error"))), cell("{}", Ref(q, _quartiles("spearman"))),
                    cell("{:.2}", Ref(row, "rel_residual", one=True)) if res.notna().all() else "–",
                    cell("{:s3}", Ref(row, "time_s", one=True)),
                    cell("{:.2}", Ref(TM01, "rel_error_at_budget", w, one=True)) if tm is not None else "",
                    cell("{}", Ref(TM01, _reached, w)) if iterative else "–"])
    return out


# its medians for the prose: x_r18_s01_<tag>_{err,rho}
for (_label, _dir, _solver), _tag in zip(SETTING_01, ("ekfac", "kfac", "arn", "lissa", "cgek", "lek"), strict=True):
    if (ROOT / _dir / "report.csv").exists():
        _q = _job_file(_dir, _solver, "ihvp_queries.csv")
        for _col, _key in (("err", "rel_error"), ("rho", "spearman")):
            SECTION.number(f"x_r18_s01_{_tag}_{_col}", cell("{}", Ref(_q, lambda df, k=_key: fmt(df[k].median(), ".2"))))

_L01 = f"{_R01}/ihvp_resnet18_original_lissa_0.1/report.csv"


def _chosen_scale(df: pd.DataFrame) -> str:
    """The scale a LiSSA search chose, from the rule its report.csv recorded at λ = 0.1."""
    found = re.search(r"chose ([0-9.e+]+)", str(df["solver/rule@0.1"].iloc[0]))
    if found is None:
        raise LookupError("no chosen scale in solver/rule@0.1")
    return f"{float(found.group(1)):,.0f}"


if (ROOT / TM01).exists():
    SECTION.number("x_r18_or_lek_reached_s", cell("{}", Ref(TM01, _reached, (("budget_of", "EK-FAC"),
                                                                            ("series", "LiSSA+EK-FAC (tuned)")))))
if (ROOT / _L01).exists():
    SECTION.number("x_r18_s01_lissa_scale", cell("{}", Ref(_L01, _chosen_scale)))

if (ROOT / _OR.report).exists():
    SECTION.table("ihvp_exact_resnet18_setting_0.1",
                  ["solver", "error: median [quartiles]", "Spearman: median [quartiles]", "own residual", "time (s)",
                   "error when EK-FAC has finished", "s to EK-FAC's error"], _setting01_rows,
                  "3.0: λ = 0.1 on the setting's model, every solver on one machine (16 queries)")

# the reduced ResNet-18 on 1,024 points (issue 29 item 7's CPU stand-in for the paper-size run: run
# ihvp_resnet18_1k_exact, run ihvp_resnet18_1k_exact_arnoldi): its own trained model, exact reference and 16 queries
R18_1K_SERIES = ("EK-FAC", "K-FAC", "Arnoldi 50, λ elsewhere")
if (ROOT / src("resnet18_1k")).exists():
    _R18K_DAMPINGS = R18_SMALL + tuple(lam for lam in R18_LARGE if _has_any("resnet18_1k", lam))
    table("ihvp_exact_resnet18_1k", "resnet18_1k", _present("resnet18_1k", R18_1K_SERIES), _R18K_DAMPINGS,
          "3.0: the same on the reduced ResNet-18 with 1,024 points (its own model, reference and queries)")
    SECTION.number("x_r18k_ref_worst", cell("{}", worst_overall("resnet18_1k")))
    for _s, _tag in (("EK-FAC", "ekfac"), ("K-FAC", "kfac"), ("Arnoldi 50, λ elsewhere", "arn")):
        if _s in _present("resnet18_1k", R18_1K_SERIES):
            for _col, _key in (("err", "error_median"), ("rho", "spearman_median")):
                SECTION.number(f"x_r18k_{_tag}_{_col}_span", cell("{}", span("resnet18_1k", _s, _key,
                                                                            dampings=R18_SMALL)))
                for _lam in _R18K_DAMPINGS[len(R18_SMALL):]:  # λ ≥ 0.1 (run ihvp_resnet18_1k_exact_large...)
                    SECTION.number(f"x_r18k_{_tag}_{_col}_{float(_lam):g}",
                                   median("resnet18_1k", _s, _lam, _key))
    _K = Sweep(MODEL_OF["resnet18_1k"])
    SECTION.number("x_r18k_test_acc", cell("{:.3}", _K("train/test_accuracy", solver="ekfac")))
    SECTION.number("x_r18k_train_loss", cell("{:.3}", _K("train/train_loss", solver="ekfac")))
    SECTION.number("x_r18k_ihvp_s", cell("{:,0}", _K("time/ihvp_s", solver="ekfac")))
    SECTION.number("x_r18k_ekfac_fit", cell("{:s3}", _K("fit/compute_s", solver="ekfac")))
    if (ROOT / "experiments/results/ihvp_resnet18_1k_exact_arnoldi/job0_ihvp.csv").exists():
        SECTION.number("x_r18k_arn_fit", cell("{}", Ref("experiments/results/ihvp_resnet18_1k_exact_arnoldi/job0_ihvp.csv",
                                                        lambda df: fmt(df["fit_s"].iloc[0], "s3"))))

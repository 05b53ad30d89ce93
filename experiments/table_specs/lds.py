"""Section 4 of RESULTS.md: the Linear Datamodeling Score (runs lds, lds_damping, lds_seeds, lds_ensemble, lds_pcg;
experiments/lds_peer.py). lds/report.csv: one job per solver, each at λ = [1e-3, auto] (the 100-subset ground
truth); lds/lds_paired.csv: every pair's difference, paired over queries; lds_peer/lds_peer.json: kronfluence on
the same model, queries and ground truth (its kronfluence ``ekfac`` entry)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
from tables_engine import Cell, Job, Ref, Section, Sweep, cell, fmt, job, paired, ref, select

SECTION = Section("4. Linear Datamodeling Score")

EKFAC, KFAC, IDENTITY = job(solver="ekfac"), job(solver="kfac"), job(solver="identity")
_LDS = Sweep("lds")
_PEER = "experiments/results/lds_peer/lds_peer.json"


def lds_ci(S: Sweep, which: Job, metric: str = "lds", bold: bool = False) -> Cell:
    return cell(("**{:.3}**" if bold else "{:.3}") + " [{:.3}, {:.3}]", S(f"{metric}/mean", which),
                S(f"{metric}/ci_low", which), S(f"{metric}/ci_high", which))


def lds_row(label: str, which: Job, bold: bool = False, time: str = "{:.1} + {:.1}", S: Sweep = _LDS,
            vs_ekfac: Cell | str | None = None) -> list[str | Cell]:
    """A ``run lds`` job (or, with ``S`` and ``vs_ekfac``, a job of another sweep on the same ground truth)."""
    if vs_ekfac is None:
        vs_ekfac = "–" if which == EKFAC else paired(_LDS, EKFAC, which)
    return [label, cell("**{:.3} ± {:.3}**" if bold else "{:.3} ± {:.3}", S("lds/mean", which),
                        S("lds/std", which)),
            cell("[{:.3}, {:.3}]", S("lds/ci_low", which), S("lds/ci_high", which)), vs_ekfac,
            cell("{:.3} [{:.3}, {:.3}]", S("lds/mean@auto", which), S("lds/ci_low@auto", which),
                 S("lds/ci_high@auto", which)),
            cell("{:.3}", S("lds_margin/mean", which)),
            cell(time, S("fit/compute_s", which), S("time/pairwise_s", which))]


# run lds_pcg (PCG, one job), paired with run lds's EK-FAC by experiments/lds_pair.py
_LDS_PCG_PAIRED = Sweep("lds_pcg").file("paired_vs_ekfac.csv")
_PCG_VS_EKFAC = cell("{:.3} [{:.3}, {:.3}]", *(ref(_LDS_PCG_PAIRED, k, measurement="loss", damping="0.001")
                                               for k in ("diff", "ci_low", "ci_high")))


def _peer(key: str) -> Ref:
    return ref(_PEER, key, library="kronfluence", strategy="ekfac")


SECTION.table("lds", ["method", "LDS (loss), λ = 1e-3: mean ± std", "95% CI", "EK-FAC minus this, paired [95% CI]",
                      "LDS (loss), λ = auto [95% CI]", "LDS (margin), λ = 1e-3", "fit + pairwise s"], [
    lds_row("influencelab EK-FAC", EKFAC, bold=True),
    lds_row("influencelab K-FAC", KFAC),
    lds_row("influencelab identity (gradient dot product; λ has no effect)", IDENTITY),
    lds_row("influencelab LiSSA + EK-FAC, depth 200: **unconverged**", job(solver="lissa_ekfac"),
            time="{:.1} (EK-FAC) + {:,0} (shared cores)"),
    lds_row("influencelab CG + EK-FAC (PCG), G on 1,000 of the 5,000 points, 100 iterations: **unconverged**", job(),
            S=Sweep("lds_pcg"), vs_ekfac=_PCG_VS_EKFAC, time="{:.1} (EK-FAC) + {:,0}"),
    ["kronfluence EK-FAC (`experiments/lds_peer.py`), its defaults, true Fisher",
     cell("{:.3} ± {:.3}", _peer("lds/mean"), _peer("lds/std")),
     cell("[{:.3}, {:.3}]", _peer("lds/ci_low"), _peer("lds/ci_high")),
     cell("{:.3} [{:.3}, {:.3}]", _peer("paired/lds/diff"), _peer("paired/lds/ci_low"), _peer("paired/lds/ci_high")),
     "–", cell("{:.3}", _peer("lds_margin/mean")), "–"],
], "4: LDS per solver")

# lds_damping: one job per solver.damping (the other columns: run lds's EK-FAC at 1e-3 and its identity)
_LD = Sweep("lds_damping")
_LD_COLS: list[tuple[Sweep, Job]] = [
    *((_LD, job(f"solver.damping={d}")) for d in ("1e-5", "1e-4")), (_LDS, EKFAC),
    *((_LD, job(f"solver.damping={d}")) for d in ("1e-2", "0.1", "auto")), (_LDS, IDENTITY)]
SECTION.table("lds_damping", ["EK-FAC λ", "1e-5", "1e-4", "1e-3", "1e-2", "0.1",
                              "auto (0.1 × the mean eigenvalue)", "identity (λ → ∞)"], [
    ["LDS (loss)", *(cell("{:.3}", S("lds/mean", j)) for S, j in _LD_COLS)],
    ["95% CI", *(cell("[{:.3}, {:.3}]", S("lds/ci_low", j), S("lds/ci_high", j)) for S, j in _LD_COLS)],
    ["LDS (margin)", *(cell("{:.3}", S("lds_margin/mean", j)) for S, j in _LD_COLS)],
], "4: LDS across damping")

# lds_seeds: one job per solver and lds.seeds_per_subset
_LSEEDS = Sweep("lds_seeds")


def _seeds(j: Job, k: int) -> Job:
    return j & job(f"lds.seeds_per_subset={k}")


SECTION.table("lds_seeds", ["seeds per subset (50 subsets)", "EK-FAC λ = 1e-3 LDS (loss) [95% CI]",
                            "identity LDS (loss) [95% CI]"], [
    ["1", lds_ci(_LSEEDS, _seeds(EKFAC, 1)), lds_ci(_LSEEDS, _seeds(IDENTITY, 1))],
    ["2", lds_ci(_LSEEDS, _seeds(EKFAC, 2)), lds_ci(_LSEEDS, _seeds(IDENTITY, 2))],
    ["1 minus 2, paired over queries [95% CI]", paired(_LSEEDS, _seeds(EKFAC, 1), _seeds(EKFAC, 2)),
     paired(_LSEEDS, _seeds(IDENTITY, 1), _seeds(IDENTITY, 2), damping="0.0")],
], "4: LDS with 1 or 2 retraining seeds per subset")

# lds_ensemble: one job per solver and score.ensemble (k)
_ENS = Sweep("lds_ensemble")
_KS = (1, 2, 4, 8)


def _k(j: Job, k: int) -> Job:
    return j & job(f"score.ensemble={k}")


SECTION.table("lds_ensemble", ["k models", "1 (the run's model)", "2", "4", "8"], [
    ["EK-FAC λ = 1e-3 LDS (loss) [95% CI]", *(lds_ci(_ENS, _k(EKFAC, k)) for k in _KS)],
    ["EK-FAC: k models minus 1, paired over queries [95% CI]", "–",
     *(paired(_ENS, _k(EKFAC, k), _k(EKFAC, 1)) for k in _KS[1:])],
    ["EK-FAC LDS (margin)", *(cell("{:.3}", _ENS("lds_margin/mean", _k(EKFAC, k))) for k in _KS)],
    ["identity LDS (loss)", *(cell("{:.3}", _ENS("lds/mean", _k(IDENTITY, k))) for k in _KS)],
    ["EK-FAC pairwise s (the members not yet cached trained and fitted first)",
     *(cell("{:,0}", _ENS("time/pairwise_s", _k(EKFAC, k))) for k in _KS)],
], "4: LDS of score ensembles")

# ---------------------------------------------------------------------------------------------------------------
# prose numbers (RESULTS.md's text quotes them as <!-- num:NAME -->...<!-- /num -->)

for _stat in ("max", "mean"):
    SECTION.number(f"lds_lissa_ekfac_residual_{_stat}",
                   cell("{:s2}", _LDS(f"solver/rel_residual_{_stat}@0.001", solver="lissa_ekfac")))
    SECTION.number(f"lds_pcg_residual_{_stat}",
                   cell("{:s2}", Sweep("lds_pcg")(f"solver/rel_residual_{_stat}@0.001", solver="cg_ekfac")))

_PAIRED = _LDS.file("lds_paired.csv")


def _auto_minus_1e3(k: str) -> Ref:
    """EK-FAC at λ = auto minus EK-FAC at 1e-3 (one job of run lds, paired over queries in its lds_paired.csv,
    written as 1e-3 minus auto: read negated)."""
    def get(df: pd.DataFrame) -> float:
        n = _LDS.number(EKFAC)
        row = select(_PAIRED, [("measurement", "loss"), ("job_a", n), ("damping_a", "0.001"), ("job_b", n),
                               ("damping_b", "auto")])
        if len(row) != 1:
            raise LookupError(f"{_PAIRED}: {len(row)} rows pair EK-FAC at 1e-3 with auto, not 1")
        return -row[{"diff": "diff", "ci_low": "ci_high", "ci_high": "ci_low"}[k]].iloc[0]
    return Ref(_PAIRED, get, via=(_LDS.report,))


def _ratio(a: Ref, b: Ref) -> Callable[[], str]:
    return lambda: fmt(a.value() / b.value(), ".1")


SECTION.number("lds_test_acc", cell("{:.3}", _LDS("train/test_accuracy", EKFAC)))
SECTION.number("lds_ekfac", cell("{:.3}", _LDS("lds/mean", EKFAC)))
SECTION.number("lds_kronfluence", cell("{:.3}", _peer("lds/mean")))
SECTION.number("lds_ekfac_minus_kronfluence", cell("{:.3} [{:.3}, {:.3}]", _peer("paired/lds/diff"),
                                                   _peer("paired/lds/ci_low"), _peer("paired/lds/ci_high")))
SECTION.number("lds_ekfac_spearman_kronfluence", cell("{:.3}", ref(
    "benchmarks/results/ekfac.csv", lambda df: min(df["spearman_self"].min(), df["spearman_pairwise"].min()),
    impl="kronfluence")))
SECTION.number("lds_ekfac_minus_identity", paired(_LDS, EKFAC, IDENTITY))
SECTION.number("lds_ekfac_over_identity", _ratio(_LDS("lds/mean", EKFAC), _LDS("lds/mean", IDENTITY)))
SECTION.number("lds_ekfac_minus_kfac", paired(_LDS, EKFAC, KFAC))
SECTION.number("lds_lissa_ekfac", cell("{:.3}", _LDS("lds/mean", job(solver="lissa_ekfac"))))
SECTION.number("lds_ekfac_minus_lissa_ekfac", paired(_LDS, EKFAC, job(solver="lissa_ekfac")))
SECTION.number("lds_ekfac_minus_lissa_ekfac_auto", cell("{:.3}", _LDS.every_job(
    lambda df: (df.loc[df["solver"] == "ekfac", "lds/mean@auto"].squeeze()
                - df.loc[df["solver"] == "lissa_ekfac", "lds/mean@auto"].squeeze()))))
_PCG = Sweep("lds_pcg")
SECTION.number("lds_pcg", cell("{:.3}", _PCG("lds/mean", solver="cg_ekfac")))
SECTION.number("lds_ekfac_minus_pcg", cell("{:.3}", ref(_LDS_PCG_PAIRED, "diff", measurement="loss",
                                                        damping="0.001")))
SECTION.number("lds_ekfac_minus_pcg_ci", _PCG_VS_EKFAC)
SECTION.number("lds_ekfac_minus_pcg_auto_ci", cell("{:.3} [{:.3}, {:.3}]", *(
    ref(_LDS_PCG_PAIRED, k, measurement="loss", damping="auto") for k in ("diff", "ci_low", "ci_high"))))
for _d in ("0.001", "auto"):
    SECTION.number(f"lds_pcg_solve_s_{_d}", cell("{:d}", _PCG(f"solver/solve_s@{_d}", solver="cg_ekfac")))
SECTION.number("lds_flat_range", lambda: (lambda v: f"{fmt(min(v), '.3')}–{fmt(max(v), '.3')}")(
    [_LD("lds/mean", job("solver.damping=1e-4")).value(), _LDS("lds/mean", EKFAC).value(),
     _LD("lds/mean", job("solver.damping=auto")).value()]))
SECTION.number("lds_auto_minus_1e-3", cell("{:.3} [{:.3}, {:.3}]", *(_auto_minus_1e3(k)
                                                                     for k in ("diff", "ci_low", "ci_high"))))
SECTION.number("lds_seeds_gain", paired(_LSEEDS, _seeds(EKFAC, 2), _seeds(EKFAC, 1), template="{:.3}"))
SECTION.number("lds_seeds_gain_ci", paired(_LSEEDS, _seeds(EKFAC, 2), _seeds(EKFAC, 1),
                                           template="[{1:.3}, {2:.3}]"))
SECTION.number("lds_seeds_identity_loss", paired(_LSEEDS, _seeds(IDENTITY, 1), _seeds(IDENTITY, 2),
                                                 damping="0.0"))
SECTION.number("lds_ensemble8_minus_1", paired(_ENS, _k(EKFAC, 8), _k(EKFAC, 1)))
SECTION.number("lds_ensemble8_minus_1_signed", paired(_ENS, _k(EKFAC, 8), _k(EKFAC, 1),
                                                      template="{:+.3} [{:.3}, {:.3}]"))

# ---------------------------------------------------------------------------------------------------------------
# the damping chosen without the ground truth (issue 27): run select_lds (stage select: held-out LDS on 100
# *training* points, 20 retrainings on half of the rest; or kronfluence's spectrum rule), then the lds preset's own
# LDS at the chosen λ; run select_lds_grid: every candidate on the same model, queries and ground truth (the oracle)
_SL, _SLG = Sweep("select_lds"), Sweep("select_lds_grid")
_SLG_ROWS = "experiments/results/select_lds_grid/report_by_damping.csv"
_CANDIDATES = ("1e-05", "0.0001", "0.001", "0.01", "0.1", "auto")


def _best_grid(df: pd.DataFrame) -> str:
    """The oracle-best candidate of the grid: its λ and LDS [CI]."""
    best = df.loc[df["lds/mean"].idxmax()]
    return f"{best['damping']}: {fmt(best['lds/mean'], '.3')} [{fmt(best['lds/ci_low'], '.3')}, " \
           f"{fmt(best['lds/ci_high'], '.3')}]"


def _selected_minus_best(objective: str) -> Ref:
    """The chosen λ's LDS minus the oracle-best candidate's (same model, queries and ground truth)."""
    def text(df: pd.DataFrame) -> str:
        (own,) = df["lds/mean"]
        return fmt(own - select(_SLG_ROWS, ())["lds/mean"].max(), "+.3")
    return Ref(_SL.report, text, (("select.objective", objective),), via=(_SLG_ROWS,))


SECTION.table("select_lds", ["objective (what it reads)", "chosen λ", "held-out LDS of the choice (training points)",
                             "LDS on section 4's ground truth [95% CI]", "oracle-best of the same grid: λ, LDS [CI]",
                             "chosen − oracle-best"],
              [[label, cell("{} ({:g3})", _SL("select/damping", **{"select.objective": o}),
                            _SL("select/lambda", **{"select.objective": o})),
                cell("{:.3}", _SL("select/score", **{"select.objective": o})) if o == "lds_holdout" else "–",
                lds_ci(_SL, job(**{"select.objective": o})), Ref(_SLG_ROWS, _best_grid),
                _selected_minus_best(o)]
               for o, label in (("lds_holdout", "lds_holdout (100 held-out training points, 20 retrainings)"),
                                ("spectrum", "spectrum (kronfluence's 0.1 × mean eigenvalue)"))],
              "4: the LDS damping chosen without the test ground truth, against the oracle-best of its grid")
SECTION.table("select_lds_grid", ["EK-FAC λ", *_CANDIDATES],
              [["LDS on the ground truth [95% CI]",
                *(cell("{:.3} [{:.3}, {:.3}]", Ref(_SLG_ROWS, "lds/mean", (("damping", d),), one=True),
                       Ref(_SLG_ROWS, "lds/ci_low", (("damping", d),), one=True),
                       Ref(_SLG_ROWS, "lds/ci_high", (("damping", d),), one=True)) for d in _CANDIDATES)],
               ["held-out LDS the selector saw (training points)",
                *(cell("{:.3}", _SL(f"select/score@{d}/all", **{"select.objective": "lds_holdout"}))
                  for d in _CANDIDATES)]],
              "4: every candidate λ, on the test ground truth and on the selector's held-out training points")
SECTION.number("select_lds_minus_best", cell("{}", _selected_minus_best("lds_holdout")))

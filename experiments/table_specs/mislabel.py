"""Section 1 of RESULTS.md: mislabel detection by self-influence (runs mislabel_*)."""

from __future__ import annotations

from collections.abc import Sequence

from tables_engine import MISSING, Cell, Job, Section, Sweep, cell, job, ph

SECTION = Section("1. Mislabel detection by self-influence")

EKFAC, KFAC, IDENTITY = job(solver="ekfac"), job(solver="kfac"), job(solver="identity")
ONLY = job()  # a sweep's only job


def si(d: float | str | None = None) -> str:
    """The metric prefix of self-influence at damping ``d`` (None: the job's only/first damping)."""
    return "mislabel/self_influence" if d is None else f"mislabel/self_influence@{float(d)!r}"


def ranking_row(label: str, S: Sweep, which: Job, method: str, cols: Sequence[tuple[str, str]],
                bold: Sequence[str] = ()) -> list[str | Cell]:
    """``label``, then ``method``'s metric ``m`` (``"recall@10"``, ``"roc_auc"``, ...) of job ``which`` in format
    ``f`` per ``(m, f)`` of ``cols``; bold where ``m`` is in ``bold``."""
    prefix = method if method.startswith("mislabel/") else f"mislabel/{method}"
    return [label] + [cell(ph(f, m in bold), S(f"{prefix}/{m}", which)) for m, f in cols]


# ---------------------------------------------------------------------------------------------------------------
# 1a / 1d (partial): mislabel detection, one row per ranking (loss and random are the same in every job: EK-FAC's)

STANDARD_COLS = [("recall@10", "%0"), ("recall@20", "%0"), ("recall@30", "%0"), ("recall@50", "%0"),
                 ("roc_auc", ".3"), ("ap", ".3")]
STANDARD_HEAD = ["ranking", "top 10%", "top 20%", "top 30%", "top 50%", "ROC AUC", "AP"]

_R = Sweep("mislabel_standard")
SECTION.table("mislabel_standard", STANDARD_HEAD, [
    ranking_row("self-influence, EK-FAC, λ = 1e-3 (solver default)", _R, EKFAC, "self_influence", STANDARD_COLS),
    ranking_row("self-influence, K-FAC, λ = 1e-3", _R, KFAC, "self_influence", STANDARD_COLS),
    ranking_row("gradient norm (identity)", _R, IDENTITY, "self_influence", STANDARD_COLS),
    ranking_row("loss", _R, EKFAC, "loss", STANDARD_COLS, bold=("recall@10", "roc_auc", "ap")),
    ranking_row("random", _R, EKFAC, "random", STANDARD_COLS),
], "1a: standard regime")

_R = Sweep("mislabel_memorize")
SECTION.table("mislabel_memorize", STANDARD_HEAD, [
    ranking_row("self-influence, EK-FAC, λ = 1e-3", _R, EKFAC, "self_influence", STANDARD_COLS),
    ranking_row("self-influence, K-FAC, λ = 1e-3", _R, KFAC, "self_influence", STANDARD_COLS),
    ranking_row("gradient norm (identity)", _R, IDENTITY, "self_influence", STANDARD_COLS),
    ranking_row("loss", _R, EKFAC, "loss", STANDARD_COLS),
    ranking_row("random", _R, EKFAC, "random", STANDARD_COLS),
], "1d: partial memorisation")

# ---------------------------------------------------------------------------------------------------------------
# 1b: damping (EK-FAC, true/empirical Fisher, K-FAC, two draws)

_D, _H, _S1, _STD = (Sweep(n) for n in ("mislabel_damping", "mislabel_damping_high", "mislabel_damping_seed1",
                                         "mislabel_standard"))
TRUE_FISHER, EMPIRICAL_FISHER = job("solver.curvature=fisher"), job("solver.curvature=empirical_fisher")
_DAMPINGS = ["1e-5", "1e-4", "1e-3", "1e-2", "0.1", "0.3", "1", "3", "10", "30"]


def damping_row(label: str, metric: str, f: str, where: dict[str, tuple[Sweep, Job, str | None]],
                identity: tuple[Sweep, Job], bold: str = "") -> list[str | Cell]:
    """One row of 1b: per damping of ``_DAMPINGS`` the (sweep, job, prefix) it comes from (``None`` prefix:
    the job's only damping), "–" where none; the ∞ column from ``identity``'s gradient-norm ranking."""
    out: list[str | Cell] = [label]
    for d in _DAMPINGS:
        if d not in where:
            out.append(MISSING)
            continue
        S, which, prefix = where[d]
        out.append(cell(ph(bold, True) if d == "1" and bold else ph(f), S(f"{prefix}/{metric}", which)))
    S, which = identity
    out.append(cell(ph(f), S(f"mislabel/identity/{metric}", which)))
    return out


def _seed0(low_job: Job, high_job: Job | None, high: Sequence[str] = ("0.3", "3", "10", "30"),
           low: Sequence[str] = ("1e-5", "1e-4", "1e-3", "1e-2", "0.1", "1")) -> dict:
    w = {d: (_D, low_job, si(d)) for d in low}
    if high_job is not None:
        w |= {d: (_H, high_job, si(d)) for d in high}
    return w


_SEED1 = {d: (_S1, ONLY, si(d)) for d in ("1e-3", "0.1", "0.3", "1", "3", "10")}
_KFAC = {"1e-3": (_STD, KFAC, si())} | {d: (_H, KFAC, si(d)) for d in ("0.3", "1", "3", "10", "30")}
_TF = _seed0(TRUE_FISHER, EKFAC)
SECTION.table("mislabel_damping", ["EK-FAC damping λ", *(f"**{d}**" if d == "1" else d for d in _DAMPINGS),
                                   "∞ (identity)"], [
    damping_row("seed 0, true Fisher: top 10%", "recall@10", "%0", _TF, (_D, TRUE_FISHER), bold="%1"),
    damping_row("seed 0, true Fisher: top 20%", "recall@20", "%0", _TF, (_D, TRUE_FISHER), bold="%1"),
    damping_row("seed 0, true Fisher: ROC AUC", "roc_auc", ".3", _TF, (_D, TRUE_FISHER), bold=".3"),
    damping_row("seed 0, empirical Fisher: top 10%", "recall@10", "%0", _seed0(EMPIRICAL_FISHER, None),
                (_D, EMPIRICAL_FISHER)),
    damping_row("seed 0, K-FAC: top 10%", "recall@10", "%0", _KFAC, (_H, KFAC)),
    damping_row("seed 1 (other subset, flips, model): top 10%", "recall@10", "%0", _SEED1, (_S1, ONLY), bold="%0"),
    damping_row("seed 1: top 20%", "recall@20", "%0", _SEED1, (_S1, ONLY), bold="%0"),
], "1b: self-influence across damping")

# ---------------------------------------------------------------------------------------------------------------
# 1c: last layer(s) only


def top2(S: Sweep, which: Job, prefix: str, f: str = "p1", bold: bool = False) -> Cell:
    """"top 10% / top 20%" of one ranking."""
    t = f"{ph(f)} / {ph(f)}"
    return cell(f"**{t}**" if bold else t, S(f"{prefix}/recall@10", which), S(f"{prefix}/recall@20", which))


def roc(S: Sweep, which: Job, prefix: str, bold: bool = False) -> Cell:
    return cell("**{:.3}**" if bold else "{:.3}", S(f"{prefix}/roc_auc", which))


_M, _MS1 = Sweep("mislabel_modules"), Sweep("mislabel_modules_seed1")
LAST1, LAST2, ALL = job("solver.modules=last:1"), job("solver.modules=last:2"), job("solver.modules=all")
_BASE = ("mislabel/identity", "mislabel/loss", "mislabel/random")
SECTION.table("mislabel_modules", ["tracked layers", "draw", "λ = 1e-3", "λ = 0.1", "**λ = 1**", "λ = 10",
                                   "gradient norm (same layers)", "loss", "random"], [
    ["last:1", "seed 0: top 10% / top 20%", top2(_M, LAST1, si(1e-3)), top2(_M, LAST1, si(0.1)),
     top2(_M, LAST1, si(1), bold=True), MISSING, *(top2(_M, LAST1, p) for p in _BASE)],
    ["last:1", "seed 0: ROC AUC", roc(_M, LAST1, si(1e-3)), roc(_M, LAST1, si(0.1)),
     roc(_M, LAST1, si(1), bold=True), MISSING, *(roc(_M, LAST1, p) for p in _BASE)],
    ["last:1", "seed 1: top 10% / top 20%", top2(_MS1, LAST1, si(1e-3)), top2(_MS1, LAST1, si(0.1)),
     top2(_MS1, LAST1, si(1), bold=True), top2(_MS1, LAST1, si(10)), *(top2(_MS1, LAST1, p) for p in _BASE)],
    ["last:1", "seed 1: ROC AUC", roc(_MS1, LAST1, si(1e-3)), roc(_MS1, LAST1, si(0.1)),
     roc(_MS1, LAST1, si(1), bold=True), roc(_MS1, LAST1, si(10)), *(roc(_MS1, LAST1, p) for p in _BASE)],
    ["last:2", "seed 0: top 10% / top 20%", top2(_M, LAST2, si(1e-3)), top2(_M, LAST2, si(0.1)),
     top2(_M, LAST2, si(1)), MISSING, *(top2(_M, LAST2, p) for p in _BASE)],
    ["all (1b)", "seed 0: top 10% / top 20%", top2(_D, TRUE_FISHER, si(1e-3), "p0"),
     top2(_D, TRUE_FISHER, si(0.1), "p0"), top2(_D, TRUE_FISHER, si(1)), top2(_H, EKFAC, si(10), "p0"),
     *(top2(_D, TRUE_FISHER, p, "p0") for p in _BASE)],
], "1c: self-influence of the last layer(s)")

# ---------------------------------------------------------------------------------------------------------------
# 1d (full memorisation): two draws (seeds 0, 1) of all layers and of the last layer; the fresh draw (seed 2,
# run mislabel_memorize_fresh, after the choice) of both

_F, _FR = Sweep("mislabel_memorize_full"), Sweep("mislabel_memorize_fresh")
# per draw: its sweep, the all-layers job, the last-layer job
_DRAWS = ((_F, ALL & job(seed=0), LAST1 & job(seed=0)), (_F, ALL & job(seed=1), LAST1 & job(seed=1)),
          (_FR, ALL, LAST1))


def three(S: Sweep, which: Job, prefix: str, bold: bool = False) -> Cell:
    t = "{:p1} / {:p1} / {:.3}"
    return cell(f"**{t}**" if bold else t, *(S(f"{prefix}/{m}", which) for m in ("recall@10", "recall@20",
                                                                                  "roc_auc")))


def full_row(label: str, layer: int, prefix: str, bold: bool = False) -> list[str | Cell]:
    """``layer`` 1: the all-layers jobs, 2: the last-layer jobs."""
    return [label, *(three(d[0], d[layer], prefix, bold) for d in _DRAWS)]


_GN = "{:p1} / {:p1} / {:.3} · {:p1} / {:p1} / {:.3}"
SECTION.table("mislabel_memorize_full", ["ranking (top 10% / top 20% / ROC AUC)", "seed 0", "seed 1",
                                         "seed 2 (fresh draw, after the choice)"], [
    full_row("self-influence, all layers, λ = 1", 1, si(1)),
    full_row("self-influence, all layers, λ = 1e-3 (preset default)", 1, si(1e-3)),
    full_row("self-influence, all layers, λ = 1e-5", 1, si(1e-5)),
    full_row("**self-influence, all layers, λ = 1e-8**", 1, si(1e-8), bold=True),
    full_row("self-influence, last layer, λ = 1e-3", 2, si(1e-3)),
    full_row("self-influence, last layer, λ = 1", 2, si(1)),
    full_row("self-influence, last layer, λ = 1e-7 (the choice made on seeds 0 and 1)", 2, si(1e-7)),
    ["gradient norm, all layers / last layer",
     *(cell(_GN, *(S(f"mislabel/identity/{m}", j) for j in (a, b) for m in ("recall@10", "recall@20", "roc_auc")))
       for S, a, b in _DRAWS)],
    full_row("loss", 1, "mislabel/loss"),
    full_row("random", 1, "mislabel/random"),
], "1d: full memorisation")

# ---------------------------------------------------------------------------------------------------------------
# 1e: LiSSA on 500 points, beside EK-FAC and the baselines on the same model

_L, _SM = Sweep("mislabel_lissa"), Sweep("mislabel_small")
_C3 = [("recall@10", "%0"), ("recall@20", "%0"), ("roc_auc", ".3")]
SECTION.table("mislabel_lissa", ["ranking", "top 10%", "top 20%", "ROC AUC", "self-influence time"], [
    ranking_row("self-influence, LiSSA, λ = 1e-3", _L, ONLY, si(1e-3), _C3)
    + [cell("{:,0} s for both λ (shared cores)", _L("time/self_s", ONLY))],
    ranking_row("self-influence, LiSSA, λ = 1", _L, ONLY, si(1), _C3) + ["(same pass)"],
    ranking_row("self-influence, EK-FAC, λ = 1e-3", _SM, EKFAC, si(1e-3), _C3)
    + [cell("fit {:.1} s + self {:.1} s for both λ", _SM("time/fit_s", EKFAC), _SM("time/self_s", EKFAC))],
    ranking_row("self-influence, EK-FAC, λ = 1", _SM, EKFAC, si(1), _C3) + ["(same pass)"],
    ranking_row("gradient norm (identity)", _SM, IDENTITY, si(1e-3), _C3)
    + [cell("{:.1} s", _SM("time/self_s", IDENTITY))],
    ranking_row("loss", _SM, EKFAC, "loss", _C3) + [""],
    ranking_row("random", _SM, EKFAC, "random", _C3) + [""],
], "1e: LiSSA vs EK-FAC on 500 points")

# ---------------------------------------------------------------------------------------------------------------
# prose numbers (RESULTS.md's text quotes them as <!-- num:NAME -->...<!-- /num -->)


def _recall_ci(S: Sweep, which: Job, prefix: str, k: int = 10) -> Cell:
    """"72.1% [70.1, 74.0]": recall at k% with its Wilson interval."""
    return cell("{:%1} [{:p1}, {:p1}]", *(S(f"{prefix}/recall@{k}{x}", which) for x in ("", "_ci_low", "_ci_high")))


for _name, _S, _which in (("std", Sweep("mislabel_standard"), EKFAC), ("mnist5k", Sweep("mnist5k_mislabel"), EKFAC),
                          ("fresh", Sweep("mislabel_memorize_fresh"), job("solver.modules=all"))):
    SECTION.number(f"{_name}_loss_top10", _recall_ci(_S, _which, "mislabel/loss"))
    if _name != "fresh":  # the fresh draw's default-λ row is not quoted
        SECTION.number(f"{_name}_ekfac_top10", _recall_ci(_S, _which, "mislabel/self_influence"))
SECTION.number("fresh_ekfac_1e-8_top10", _recall_ci(Sweep("mislabel_memorize_fresh"), job("solver.modules=all"),
                                                    si(1e-8)))

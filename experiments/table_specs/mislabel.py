"""Section 1 of RESULTS.md: mislabel detection by self-influence (runs mislabel_*)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
from tables_engine import MISSING, Cell, Job, Ref, Section, Sweep, cell, exists, fmt, job, load, ph, ref, ref1

from influencelab.metric_names import metric_name

SECTION = Section("1. Mislabel detection by self-influence")

EKFAC, KFAC, IDENTITY = job(solver="ekfac"), job(solver="kfac"), job(solver="identity")
ONLY = job()  # a sweep's only job


def si(d: float | str | None = None) -> str:
    """The metric prefix of self-influence at damping ``d`` (None: the job's only/first damping)."""
    return metric_name("mislabel/self_influence", None if d is None else float(d), exact=True)


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

# ---------------------------------------------------------------------------------------------------------------
# 1f: λ and layers chosen without the flip mask (stage select), validated on fresh draws against the oracle-best
# setting of the same grid; experiments/results/select_validation/<regime>.csv, written by
# `python experiments/select_validation.py multirun <regime> ...` from the select_<regime>(_grid) sweeps

VALIDATION = "experiments/results/select_validation/{}.csv"
VALIDATION_HEAD = ["draw (seed)", "selected: layers, λ", "selected: top 10% / ROC AUC",
                   "oracle-best of the grid: layers, λ", "oracle-best: top 10% / ROC AUC",
                   "selected − oracle-best, top 10% [95% CI]", "kronfluence's rule (λ = 0.1 × mean eigenvalue): top 10%",
                   "selected − kronfluence's rule [95% CI]", "loss: top 10%", "selected − loss [95% CI]"]


def _setting(prefix: str) -> Callable[[pd.DataFrame], str]:
    def text(df: pd.DataFrame) -> str:
        (row,) = df.to_dict("records")
        d = row[f"{prefix}_damping"]
        return f"{row[f'{prefix}_modules']}, {d if d == 'auto' else f'{float(d):g}'}"
    return text


def validation_rows(regime: str) -> list[list[str | Cell]]:
    src = VALIDATION.format(regime)
    rows: list[list[str | Cell]] = []
    for seed in sorted(int(s) for s in load(src)["seed"]):
        def R(key: Any, seed: int = seed) -> Ref:
            return ref1(src, key, seed=seed)

        def diff(name: str) -> Cell:
            return cell("{:+p1} [{:+p1}, {:+p1}]", R(name), R(f"{name}_ci_low"), R(f"{name}_ci_high"))

        rows.append([str(seed), cell("{}", R(_setting("selected"))),
                     cell("{:%1} / {:.3}", R("selected_recall10"), R("selected_auc")),
                     cell("{}", R(_setting("oracle"))), cell("{:%1} / {:.3}", R("oracle_recall10"), R("oracle_auc")),
                     diff("selected_minus_oracle10"), cell("{:%1}", R("spectrum_recall10")),
                     diff("selected_minus_spectrum10"), cell("{:%1}", R("loss_recall10")),
                     diff("selected_minus_loss10")])
    return rows


for _regime in ("digits", "mnist5k", "fmnist", "fmnist_memorize"):
    if exists(VALIDATION.format(_regime)):
        SECTION.table(f"select_{_regime}", VALIDATION_HEAD, lambda r=_regime: validation_rows(r),
                      f"1f: λ and layers chosen without the flip mask, {_regime}")

_REGIME_NAMES = {"digits": "digits (1,437 points)", "mnist5k": "MNIST-5k (4,000 points)",
                 "fmnist": "FashionMNIST, standard (20,000 points)",
                 "fmnist_memorize": "FashionMNIST, memorised (5,000 points)"}


def _summary(regime: str, what: str) -> Ref:
    """An aggregate over a regime's draws: ``what`` is ``mean:<column>`` or ``worst:<column>`` (the minimum)."""
    how, col = what.split(":")
    return ref(VALIDATION.format(regime), lambda df: float(getattr(df[col], "mean" if how == "mean" else "min")()))


def summary_rows() -> list[list[str | Cell]]:
    rows: list[list[str | Cell]] = []
    for regime, label in _REGIME_NAMES.items():
        if not exists(VALIDATION.format(regime)):
            continue
        rows.append([label, cell("{:d}", ref(VALIDATION.format(regime), len)),
                     cell("{:%1}", _summary(regime, "mean:selected_recall10")),
                     cell("{:%1}", _summary(regime, "mean:oracle_recall10")),
                     cell("{:+p1} / {:+p1}", _summary(regime, "mean:selected_minus_oracle10"),
                          _summary(regime, "worst:selected_minus_oracle10")),
                     cell("{:%1}", _summary(regime, "mean:spectrum_recall10")),
                     cell("{:+p1} / {:+p1}", _summary(regime, "mean:selected_minus_spectrum10"),
                          _summary(regime, "worst:selected_minus_spectrum10")),
                     cell("{:%1}", _summary(regime, "mean:loss_recall10"))])
    return rows


SECTION.table("select_summary", ["regime", "fresh draws", "selected: top 10% (mean)", "oracle-best: top 10% (mean)",
                                 "selected − oracle-best: mean / worst draw (points)",
                                 "kronfluence's rule: top 10% (mean)",
                                 "selected − kronfluence's rule: mean / worst draw (points)", "loss: top 10% (mean)"],
              summary_rows, "1f: the selector against the oracle-best setting and kronfluence's rule, per regime")

# ---------------------------------------------------------------------------------------------------------------
# 1g: every ranking against the loss baseline, paired over the flipped points (runs *_paired: the sweeps of 1a,
# 1d's fresh draw and 6b rerun with mislabel/<ranking>/minus_loss_top{10,20}: difference, 95% bootstrap interval
# over the flipped points, exact McNemar p)


def vs_loss(S: Sweep, which: Job, prefix: str, k: int = 10) -> Cell:
    """"-16.5 [-18.5, -14.4] (p < 1e-4)": recall at k% minus the loss's, paired, with its interval and p."""
    base = f"{prefix}/minus_loss_top{k}"

    def p_text(df: pd.DataFrame) -> str:
        (p,) = df[f"{base}_p"].to_numpy()
        return "p < 1e-4" if p < 1e-4 else f"p = {fmt(p, 'g2')}"
    return cell("{:+p1} [{:+p1}, {:+p1}] ({})", S(base, which), S(f"{base}_ci_low", which),
                S(f"{base}_ci_high", which), S(p_text, which))


def recall_pair(S: Sweep, which: Job, prefix: str) -> Cell:
    return cell("{:%1} / {:%1}", S(f"{prefix}/recall@10", which), S("mislabel/loss/recall@10", which))


_STDP, _M5P, _FRP = Sweep("mislabel_standard_paired"), Sweep("mnist5k_mislabel_paired"), \
    Sweep("mislabel_memorize_fresh_paired")
_ALL, _LAST = job("solver.modules=all"), job("solver.modules=last:1")
_VS_LOSS = [
    ("FashionMNIST, standard (1a)", "EK-FAC, λ = 1e-3 (solver default)", _STDP, EKFAC, "mislabel/self_influence"),
    ("FashionMNIST, standard (1a)", "K-FAC, λ = 1e-3", _STDP, KFAC, "mislabel/self_influence"),
    ("FashionMNIST, standard (1a)", "gradient norm (identity)", _STDP, IDENTITY, "mislabel/self_influence"),
    ("MNIST-5k (6b)", "EK-FAC, λ = 1e-3 (solver default)", _M5P, EKFAC, "mislabel/self_influence"),
    ("MNIST-5k (6b)", "gradient norm (identity)", _M5P, IDENTITY, "mislabel/self_influence"),
    ("FashionMNIST, memorised, seed 2 (1d)", "EK-FAC all layers, λ = 1e-3", _FRP, _ALL, "mislabel/self_influence"),
    ("FashionMNIST, memorised, seed 2 (1d)", "EK-FAC all layers, λ = 1e-8 (oracle-tuned on seeds 0, 1)", _FRP, _ALL,
     si(1e-8)),
    ("FashionMNIST, memorised, seed 2 (1d)", "EK-FAC last layer, λ = 1e-7 (oracle-tuned on seeds 0, 1)", _FRP, _LAST,
     si(1e-7)),
]
SECTION.table("mislabel_vs_loss", ["data", "self-influence", "top 10%: this / loss",
                                   "this − loss at 10%, paired [95% CI] (McNemar)",
                                   "this − loss at 20%, paired [95% CI] (McNemar)"],
              [[data, label, recall_pair(S, w, pre), vs_loss(S, w, pre), vs_loss(S, w, pre, 20)]
               for data, label, S, w, pre in _VS_LOSS],
              "1g: self-influence minus the loss baseline, paired over the flipped points")
for _name, (_S, _w, _pre) in {"std_ekfac": (_STDP, EKFAC, "mislabel/self_influence"),
                              "mnist5k_ekfac": (_M5P, EKFAC, "mislabel/self_influence"),
                              "fresh_1e-8": (_FRP, _ALL, si(1e-8))}.items():
    SECTION.number(f"{_name}_minus_loss10", vs_loss(_S, _w, _pre))


def _validation() -> pd.DataFrame:
    return pd.concat([load(VALIDATION.format(r)) for r in _REGIME_NAMES], ignore_index=True)


SECTION.number("select_within_1pt", lambda: (lambda d: f"{int((d >= -0.01).sum())} of {len(d)}")(
    _validation()["selected_minus_oracle10"]))
SECTION.number("select_worst_shortfall", lambda: fmt(-_validation()["selected_minus_oracle10"].min(), "p1"))
SECTION.number("select_fmnist_vs_spectrum", lambda: (lambda d: f"{fmt(d.min(), 'p0')}–{fmt(d.max(), 'p0')}")(
    load(VALIDATION.format("fmnist"))["selected_minus_spectrum10"]))
SECTION.number("select_fmnist_loss_gap", lambda: (lambda d: f"{fmt(-d.max(), 'p1')}–{fmt(-d.min(), 'p1')}")(
    load(VALIDATION.format("fmnist"))["selected_minus_loss10"]))

# ---------------------------------------------------------------------------------------------------------------
# section 1's other prose numbers (1a-1g), from the same sweeps as its tables


def _span(refs: Sequence[Ref], f: str, unit: str = "", signed: int = 1) -> Callable[[], str]:
    """"lo–hi" of the values of ``refs`` (times ``signed``) in format ``f``, ``unit`` after the upper end."""
    def text() -> str:
        v = [signed * float(r.value()) for r in refs]
        return f"{fmt(min(v), f)}–{fmt(max(v), f)}{unit}"
    return text


def _calc(f: Callable[..., float], *refs: Ref) -> Ref:
    """``f`` of the values of ``refs``, as one value (all of them read when it is)."""
    return Ref(refs[0].path(), lambda df: f(*(float(r.value()) for r in refs)),
               via=tuple(sorted({r.path() for r in refs[1:]})))


def _diff(a: Ref, b: Ref) -> Ref:
    return _calc(lambda x, y: x - y, a, b)


_STD_R, _MEM, _S1R = Sweep("mislabel_standard"), Sweep("mislabel_memorize"), Sweep("mislabel_damping_seed1")
SECTION.number("std_test_accuracy", cell("{:.3}", _STD_R("train/test_accuracy", EKFAC)))
# 1b
SECTION.number("damping_s0_at_1", cell("{:%1} / {:%1}, ROC AUC {:.3}", *(_D(f"{si(1)}/{m}", TRUE_FISHER)
                                                                          for m in ("recall@10", "recall@20",
                                                                                    "roc_auc"))))
SECTION.number("damping_s1_at_1", cell("{:%0} / {:%0}", *(_S1(f"{si(1)}/{m}", ONLY) for m in ("recall@10",
                                                                                             "recall@20"))))
SECTION.number("damping_gain_1_over_1e-3", _span([_diff(_D(f"{si(1)}/recall@10", TRUE_FISHER),
                                                        _D(f"{si(1e-3)}/recall@10", TRUE_FISHER)),
                                                  _diff(_S1(f"{si(1)}/recall@10", ONLY),
                                                        _S1(f"{si(1e-3)}/recall@10", ONLY))], "p0"))
SECTION.number("damping_identity_top10", _span([_D("mislabel/identity/recall@10", TRUE_FISHER),
                                                 _S1("mislabel/identity/recall@10", ONLY)], "p0", "%"))
# 1c: the last layer at λ = 0.1 and 1 on both draws
_LAST_GOOD = [(S, d) for S in (_M, _MS1) for d in (0.1, 1)]
SECTION.number("modules_last1_top10", _span([S(f"{si(d)}/recall@10", LAST1) for S, d in _LAST_GOOD], "p1", "%"))
SECTION.number("modules_last1_top20", _span([S(f"{si(d)}/recall@20", LAST1) for S, d in _LAST_GOOD], "p1", "%"))
SECTION.number("modules_last1_times", cell("fit {:.0} s and scoring {:.1} s", _M("time/fit_s", LAST1),
                                           _M("time/self_s", LAST1)))
SECTION.number("modules_loss_top10", _span([S("mislabel/loss/recall@10", LAST1) for S in (_M, _MS1)], "p0", "%"))
SECTION.number("modules_gap_narrowed", cell("{:p0}", _diff(_M(f"{si(1)}/recall@10", LAST1),
                                                          _STD_R("mislabel/self_influence/recall@10", EKFAC))))
# 1d, partial memorisation
SECTION.number("memorize_test_accuracy", cell("{:.3}", _MEM("train/test_accuracy", EKFAC)))
SECTION.number("memorize_train_accuracy", cell("{:.3}", _MEM("train/train_accuracy", EKFAC)))
SECTION.number("memorize_train_s", cell("{:,0} s", _MEM("time/train_s", EKFAC)))
SECTION.number("memorize_loss_vs_std", cell("{:%0} vs {:%0}", _MEM("mislabel/loss/recall@10", EKFAC),
                                            _STD_R("mislabel/loss/recall@10", EKFAC)))
# 1d, full memorisation: seeds 0 and 1 (_F), the fresh seed 2 (_FR)
_F0, _F1 = ALL & job(seed=0), ALL & job(seed=1)
SECTION.number("full_fit", cell("accuracy {:.3} / {:.3} on the noisy training labels, training loss {:e1} / {:e1}; "
                                "test accuracy {:.3} / {:.3}",
                                *(_F(m, j) for m in ("train/train_accuracy", "train/train_loss", "train/test_accuracy")
                                  for j in (_F0, _F1))))
SECTION.number("full_train_s", cell("{:.0} s and {:.0} s", _F("time/train_s", _F0), _F("time/train_s", _F1)))
SECTION.number("full_self_s_max", cell("{:s2}", _F.every_job(lambda df: float(df["time/self_s"].max()))))
SECTION.number("fresh_fit", cell("training {:.0} s, test accuracy {:.3}, training loss {:e1}",
                                 *(_FR(m, ALL) for m in ("time/train_s", "train/test_accuracy", "train/train_loss"))))
SECTION.number("full_loss_top10", _span([S("mislabel/loss/recall@10", j) for S, j, _ in _DRAWS], "p0", "%"))
SECTION.number("fresh_all_1_to_1e-8", cell("{:%1} → {:%1}", _FR(f"{si(1)}/recall@10", ALL),
                                           _FR(f"{si(1e-8)}/recall@10", ALL)))
for _k in (10, 20):
    SECTION.number(f"full_1e-8_minus_loss{_k}", _span([_diff(S(f"{si(1e-8)}/recall@{_k}", j),
                                                             S(f"mislabel/loss/recall@{_k}", j))
                                                       for S, j, _ in _DRAWS], "p1"))
SECTION.number("full_auc_1e-8_vs_loss", lambda: (f"{_span([S(f'{si(1e-8)}/roc_auc', j) for S, j, _ in _DRAWS], '.3')()}"
                                                 f" vs {_span([S('mislabel/loss/roc_auc', j) for S, j, _ in _DRAWS], '.3')()}"))
_FRESH_CI = [_FR(f"{si(1e-8)}/recall@10{x}", ALL) for x in ("", "_ci_low", "_ci_high")]
SECTION.number("fresh_1e-8_ci_halfwidth", cell("±{:p1}", _calc(lambda lo, hi: (hi - lo) / 2, *_FRESH_CI[1:])))
SECTION.number("fresh_1e-8_top10_ci_pct", cell("{:%1} [{:%1}, {:%1}]", *_FRESH_CI))
SECTION.number("full_last_1e-7_s01", cell("{:%1}, {:%1}", *(_F(f"{si(1e-7)}/recall@10", LAST1 & job(seed=s))
                                                           for s in (0, 1))))
SECTION.number("fresh_last_1e-7", cell("{:%1}", _FR(f"{si(1e-7)}/recall@10", LAST1)))
SECTION.number("fresh_loss_top10_short", cell("{:%1}", _FR("mislabel/loss/recall@10", ALL)))
SECTION.number("fresh_all_1e-8_top10_short", cell("{:%1}", _FR(f"{si(1e-8)}/recall@10", ALL)))
SECTION.number("fresh_last_1_to_1e-8", cell("{:%1} at λ = 1 to {:%1} at 1e-8", _FR(f"{si(1)}/recall@10", LAST1),
                                            _FR(f"{si(1e-8)}/recall@10", LAST1)))
SECTION.number("select_memorize_picks_1e-8", lambda: (lambda d: f"{int((d == 1e-8).sum())} of {len(d)}")(
    load(VALIDATION.format("fmnist_memorize"))["selected_damping"].astype(float)))
# 1e: LiSSA (mislabel_lissa) against EK-FAC on the same 500-point model (mislabel_small)
SECTION.number("ml_lissa_test_accuracy", cell("{:.3}", _L("train/test_accuracy", ONLY)))


def _lissa_ekfac_gap() -> str:
    """The largest difference between LiSSA's and EK-FAC's recall (top 10% and 20%, each λ), in flipped points."""
    n = int(_L("train/n_flipped", ONLY).value())
    gap = max(abs(float(_L(f"{si(d)}/recall@{k}", ONLY).value()) - float(_SM(f"{si(d)}/recall@{k}", EKFAC).value()))
              for d in (1e-3, 1) for k in (10, 20))
    return f"{round(gap * n):d} of the {n} flipped points ({fmt(gap, 'p0')} points of recall)"


SECTION.number("ml_lissa_ekfac_gap", _lissa_ekfac_gap)


def _lissa_tie10() -> str:
    """"all three 64%" when LiSSA, EK-FAC (both λ) and the loss find the same share at 10%."""
    v = {fmt(r.value(), "%0") for r in [_L(f"{si(d)}/recall@10", ONLY) for d in (1e-3, 1)]
         + [_SM(f"{si(d)}/recall@10", EKFAC) for d in (1e-3, 1)] + [_SM("mislabel/loss/recall@10", EKFAC)]}
    return f"all three {v.pop()}" if len(v) == 1 else "not all equal: " + ", ".join(sorted(v))


SECTION.number("ml_lissa_tie10", _lissa_tie10)
_LISSA_RATIO = _calc(lambda lissa, fit, self_: lissa / (fit + self_), _L("time/self_s", ONLY),
                     _SM("time/fit_s", EKFAC), _SM("time/self_s", EKFAC))
SECTION.number("ml_lissa_cost_ratio", cell("~{:s1}×", _LISSA_RATIO))
SECTION.number("ml_lissa_hours_20k", cell("~{:s2} h", _calc(lambda s, n, n_full: s * n_full / n / 3600,
                                                           _L("time/self_s", ONLY), _L("train/n_train", ONLY),
                                                           _STD_R("train/n_train", EKFAC))))
# 1f
SECTION.number("select_memorize_beats_loss", lambda: (lambda df: (lambda w: f"{len(w)} of {len(df)} fresh draws by "
                                                                             f"{fmt(w.min(), 'p1')}–{fmt(w.max(), 'p1')}"
                                                                  )(df.loc[df["selected_minus_loss10_ci_low"] > 0,
                                                                           "selected_minus_loss10"]))(
    load(VALIDATION.format("fmnist_memorize"))))
for _regime in _REGIME_NAMES:
    SECTION.number(f"select_within_2pt_{_regime}", lambda r=_regime: (
        lambda d: f"{int((d >= -0.02 - 1e-9).sum())} of {len(d)}")(load(VALIDATION.format(r))["selected_minus_oracle10"]))
# 1g: the standard-regime rows of mislabel_vs_loss (FashionMNIST 1a, MNIST-5k 6b)
_STD_ROWS = [(S, w, pre) for _, _, S, w, pre in _VS_LOSS if S in (_STDP, _M5P)]
SECTION.number("vs_loss_std_deficit10", _span([S(f"{pre}/minus_loss_top10", w) for S, w, pre in _STD_ROWS], "p0",
                                              signed=-1))
SECTION.number("vs_loss_fmnist_curv_deficit20", _span([_STDP("mislabel/self_influence/minus_loss_top20", w)
                                                       for w in (EKFAC, KFAC)], "p1", signed=-1))
SECTION.number("vs_loss_fmnist_gradnorm_deficit20", cell("{:p1}", _calc(lambda x: -x, _STDP(
    "mislabel/self_influence/minus_loss_top20", IDENTITY))))
SECTION.number("vs_loss_mnist5k_diff20", lambda: (lambda v: fmt(max(v, key=abs), "+p1"))(
    [float(_M5P("mislabel/self_influence/minus_loss_top20", w).value()) for w in (EKFAC, IDENTITY)]))
# the summary: the last layer at λ = 1 on both draws (1c); every non-random ranking of 1d's full memorisation at 10%
SECTION.number("summary_last1_at_1", _span([S(f"{si(1)}/recall@10", LAST1) for S in (_M, _MS1)], "p1", "%"))


def _memorised_all_top10() -> str:
    """"lo–hi%": recall at 10% of every ranking but random (every λ, both layer sets), over the three draws."""
    v = [float(x) for S, a, b in _DRAWS for j in (a, b) for r in [S(lambda df: df, j).value()]
         for c in r.columns if c.startswith("mislabel/") and c.endswith("/recall@10") and "/random/" not in c
         for x in r[c]]
    return f"{fmt(min(v), 'p0')}–{fmt(max(v), '%0')}"


SECTION.number("summary_memorised_top10", _memorised_all_top10)

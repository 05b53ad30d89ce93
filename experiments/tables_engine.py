"""The engine behind experiments/RESULTS.md's generated tables: reading committed result files, selecting rows,
formatting cells, and writing or checking RESULTS.md. The tables themselves are specs in
``experiments/table_specs/<section>.py``, one module per RESULTS.md section; ``experiments/tables.py`` is the
command line.

RESULTS.md marks every generated table with a pair of HTML comments::

    <!-- table:NAME -->
    | ... the table, rewritten by tables.py ... |
    <!-- /table -->

and ``TABLES[NAME]`` (a :class:`Table`, registered by a spec module through its :class:`Section`) says which
committed files (``experiments/results/**`` or ``benchmarks/results/**``, CSV or JSON) it reads, which rows and
columns, and how every value is rounded.

Rows of a sweep are chosen by what the job was, never by where it stands: ``Sweep("lds")("lds/mean",
solver="ekfac")`` is the LDS of the one job of ``experiments/results/lds/report.csv`` whose ``solver`` override is
``ekfac`` (:func:`job` names a job by several overrides, dotted ones included: ``job("solver=cg",
"solver.damping=1e-3")``). A selection that matches no job or several fails, naming the table, the file and the
overrides, so reordering or extending a sweep can never silently move a number.

Formats (the part after ``:`` in a ``{}`` of a template; rounded as Python's ``format`` rounds: the float's exact
binary value, ties to even, so 0.8105 -> 81.0% and 0.885 -> 88%):

- ``.N``  fixed, N decimals (``0.266``);  ``,N`` the same with thousands separators (``1,476``)
- ``%N``  percent with N decimals and a % sign (``72%``, ``81.0%``);  ``%~N`` up to N decimals (``81.75%``, ``92%``)
- ``pN``  percent points without the sign (``79.6``)
- ``sN``  N significant digits, at most 2 decimals (``0.07``, ``7.1``, ``450``);  ``gN`` N significant digits (``0.0032``)
- ``eN``  N significant digits, scientific from 1,000 up and below 0.01 (``2.4e5``, ``240``)
- ``d``   integer;  no format: the value as text
- a leading ``+`` on any of these: an explicit sign for differences (``+1.2``, ``-0.3``)
Missing values (empty cells, NaN) print as ``–``.

Prose numbers: a spec module registers, beside its tables, each number that RESULTS.md's text quotes,
``SECTION.number("lds_ekfac", cell("{:.3}", LDS("lds/mean", solver="ekfac")))`` (a :class:`Cell`, or any function
returning the text), and the text marks it ``<!-- num:lds_ekfac -->0.269<!-- /num -->``. They are collected in
``NUMBERS`` as tables are in ``TABLES``; :func:`render` refills every marked number from its files as it does the
tables, so ``--check`` fails when a rerun leaves a quoted number behind, and :func:`problems` refuses a marker
without a spec or a spec without a marker.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import math
import re
import string
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

from influencelab.metric_names import metric_name

__all__ = ["MISSING", "NUMBERS", "RESULTS_MD", "ROOT", "TABLES", "Cell", "Job", "JobFile", "Number", "Ref", "Row",
           "Section", "SpecError", "Sweep", "Table", "cell", "current", "exists", "fmt", "job", "load", "load_specs",
           "load_text", "main", "markers", "number_text", "numbers_in", "paired", "path", "ph", "problems", "reading_from", "ref",
           "ref1", "render", "select", "timing"]

ROOT = Path(__file__).resolve().parent.parent  # the repository
RESULTS_MD = ROOT / "experiments" / "RESULTS.md"
SPECS = Path(__file__).resolve().parent / "table_specs"
MISSING = "–"

# ----------------------------------------------------------------------------------------------------------------
# committed files

_data_root = ROOT  # where the committed files are read from (reading_from() points it at a copy)


def path(src: str) -> Path:
    """The file ``src`` (a path relative to the repository) as read now."""
    return _data_root / src


def exists(src: str) -> bool:
    return path(src).is_file()


@contextmanager
def reading_from(root: Path) -> Iterator[None]:
    """Read every committed file from ``root`` instead of the repository (a copy with the same layout, e.g. with a
    sweep's jobs reordered) while the block runs."""
    global _data_root
    old, _data_root = _data_root, Path(root)
    _forget()
    try:
        yield
    finally:
        _data_root = old
        _forget()


def _forget() -> None:
    """Drop every file read and row selected (the files are read again, from where they are read now)."""
    for f in (load, load_text, _select):
        f.cache_clear()


def _read(src: str, **csv: Any) -> pd.DataFrame:
    p = path(src)
    if p.suffix == ".json":
        obj = json.loads(p.read_text())
        return pd.DataFrame(obj if isinstance(obj, list) else [obj])
    return pd.read_csv(p, **csv)


@cache
def load(src: str) -> pd.DataFrame:
    """A committed CSV (one row per job) or JSON (an object: one row; a list of objects: one row each), by its path
    relative to the repository. For a ``report.csv`` whose job swept ``solver.damping`` as a list, the first
    damping's ``mislabel/self_influence/*`` columns are also given under ``mislabel/self_influence@<λ>/*`` (the
    name the other dampings of the list have), so that a table can address every damping the same way."""
    df = _read(src)
    if "solver.damping" in df:
        extra: dict[str, list[Any]] = {}
        for i, d in enumerate(df["solver.damping"].astype(str)):
            if not d.startswith("["):
                continue
            first = float(d.strip("[]").split(",")[0])
            for col in [c for c in df.columns if c.startswith("mislabel/self_influence/")]:
                alias = metric_name("mislabel/self_influence", first, col.split("self_influence/", 1)[1], exact=True)
                if alias not in df.columns:
                    extra.setdefault(alias, [math.nan] * len(df))[i] = df[col].iloc[i]
                elif pd.isna(df.at[i, alias]):
                    df.at[i, alias] = df[col].iloc[i]
        if extra:
            df = pd.concat([df, pd.DataFrame(extra, index=df.index)], axis=1)
    return df


def _text(v: Any) -> str:
    """A value as the text a selection compares: hydra's escapes undone (``last\\:1`` is ``last:1``), ``None``
    as hydra's ``null``."""
    return re.sub(r"\\(.)", r"\1", "null" if v is None else str(v))


def _number(s: str) -> float | None:
    try:
        x = float(s)
    except ValueError:
        return None
    return None if math.isnan(x) else x


@cache
def load_text(src: str) -> pd.DataFrame:
    """The rows of :func:`load` (same index) with every cell as the text the file has (``null``, ``auto``,
    ``[0.001,auto]`` and empty cells as written), which selections compare against."""
    return _read(src, dtype=str, keep_default_na=False).map(_text)


def _matches(column: pd.Series, v: Any) -> pd.Series:
    """Rows whose text ``column`` (of :func:`load_text`) equals ``v``: as text, or as numbers where both are
    (``solver.damping=1e-3`` matches ``0.001``, ``n=20000.0`` matches ``20000``)."""
    want = _text(v)
    same = column == want
    number = None if isinstance(v, bool) else _number(want)
    return same if number is None else same | (column.map(_number) == number)


def _describe(where: Sequence[tuple[str, Any]]) -> str:
    return ", ".join(f"{k}={v}" for k, v in where) if where else "no selection"


def select(src: str, where: Sequence[tuple[str, Any]]) -> pd.DataFrame:
    """The rows of ``src`` whose columns have the values of ``where`` (each ``(column, value)`` as in
    :func:`_matches`; all rows when it is empty)."""
    return _select(src, tuple(where))


@cache
def _select(src: str, where: tuple[tuple[str, Any], ...]) -> pd.DataFrame:
    df, text = load(src), load_text(src)
    keep = pd.Series(True, index=text.index)
    for k, v in where:
        if k not in text.columns:
            raise KeyError(f"{src}: no column {k!r} to select {k}={v} by")
        keep &= _matches(text[k], v)
    return df[keep.to_numpy()]


TIMINGS = "experiments/results/timings.txt"  # run_here.sh appends "NAME: SECONDS s ..." per sweep


def timing(name: str, src: str = TIMINGS) -> float:
    """The wall time in seconds of sweep ``name`` as ``run_here.sh`` last appended it to ``timings.txt`` (its last
    line ``NAME: <seconds> s ...``; a rerun appends a new line, which then wins)."""
    hits = re.findall(rf"^{re.escape(name)}: ([0-9.]+) s\b", path(src).read_text(), re.MULTILINE)
    if not hits:
        raise LookupError(f"{src}: no line for {name}")
    return float(hits[-1])


# ----------------------------------------------------------------------------------------------------------------
# values: one cell of a committed file, a job of a sweep


@dataclass(frozen=True)
class Job:
    """One job of a sweep, named by the values of its overrides: the override columns of the sweep's report.csv
    (``solver``, ``solver.damping``, ``seed``, ``unlearn.size``, ... as in the job's ``.hydra/overrides.yaml``),
    never by its number, so that reordering a sweep's jobs leaves every table as it is. No overrides: the sweep's
    only job (an error once the sweep has more)."""

    overrides: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        return _describe(self.overrides) if self.overrides else "its only job"

    def __and__(self, other: Job) -> Job:
        return Job(self.overrides + other.overrides)


def job(*overrides: str, **values: Any) -> Job:
    """``job("solver=cg", "solver.damping=1e-3")`` (overrides as written on the command line) or
    ``job(solver="cg")``, or both."""
    pairs: list[tuple[str, Any]] = []
    for o in overrides:
        k, eq, v = o.partition("=")
        if not eq:
            raise ValueError(f"job({o!r}): an override is key=value")
        pairs.append((k.strip(), v.strip()))
    pairs += values.items()
    if any(k in ("job", "row") for k, _ in pairs):
        raise ValueError(f"job({_describe(pairs)}): select a job by its overrides, not by its number")
    return Job(tuple(pairs))


@dataclass(frozen=True)
class JobFile:
    """A job's own file of a sweep, ``job<N>_<suffix>`` (run_here.sh copies multirun/NAME/<N>/<suffix> there), N
    found through the sweep's report.csv by the job's overrides."""

    sweep: Sweep
    job: Job
    suffix: str

    def __str__(self) -> str:
        return self.path()

    def path(self) -> str:
        return f"{self.sweep.dir}/job{self.sweep.number(self.job)}_{self.suffix}"


@dataclass(frozen=True)
class Ref:
    """One value of a committed file: column ``key`` of the one row that ``where`` selects (see :func:`select`);
    or, with a callable ``key``, what it returns for the rows ``where`` selects (exactly one with ``one``, all
    rows when ``where`` is empty). ``src`` is a path relative to the repository or a :class:`JobFile`; ``via``
    names other files read to find the value (a sweep's report.csv, for its job numbers)."""

    src: str | JobFile
    key: str | Callable[[pd.DataFrame], Any]
    where: tuple[tuple[str, Any], ...] = ()
    one: bool = False
    via: tuple[str, ...] = ()

    def path(self) -> str:
        return self.src if isinstance(self.src, str) else self.src.path()

    def sources(self) -> set[str]:
        """The files this value is read from."""
        extra = (self.src.sweep.report,) if isinstance(self.src, JobFile) else ()
        return {self.path(), *self.via, *extra}

    def rows(self) -> pd.DataFrame:
        return select(self.path(), self.where)

    def value(self) -> Any:
        df, src = self.rows(), self.path()
        if callable(self.key) and not self.one:
            return self.key(df)
        if isinstance(self.key, str) and self.key not in df.columns:
            raise KeyError(f"{src}: no column {self.key!r}")
        if len(df) != 1:
            raise LookupError(f"{src}: {_describe(self.where)} selects {len(df)} rows, not 1")
        return self.key(df) if callable(self.key) else df[self.key].iloc[0]


def ref(src: str, key: str | Callable[[pd.DataFrame], Any], **where: Any) -> Ref:
    """A value of a committed file (a callable ``key`` sees every row ``where`` selects)."""
    return Ref(src, key, tuple(where.items()))


def ref1(src: str, key: str | Callable[[pd.DataFrame], Any], **where: Any) -> Ref:
    """A value of the one row ``where`` selects (a callable ``key`` sees that row only; none or several fail)."""
    return Ref(src, key, tuple(where.items()), one=True)


@dataclass(frozen=True)
class Sweep:
    """A committed sweep, ``experiments/results/NAME/``: its ``report.csv`` (one row per job, with the job's
    override columns) and its jobs' own files. ``S = Sweep("lds")``; ``S("lds/mean", solver="ekfac")`` or
    ``S("lds/mean", job("solver=ekfac"))`` is the value of the one job with those overrides."""

    name: str
    root: str = "experiments/results"

    @property
    def dir(self) -> str:
        return f"{self.root}/{self.name}"

    @property
    def report(self) -> str:
        return f"{self.dir}/report.csv"

    def file(self, name: str) -> str:
        """Another file of the sweep (``lds_paired.csv``, ``paired_vs_ekfac.csv``)."""
        return f"{self.dir}/{name}"

    def __call__(self, key: str | Callable[[pd.DataFrame], Any], which: Job | None = None, /,
                 **overrides: Any) -> Ref:
        """Column ``key`` of the job ``which`` and/or ``overrides`` select (a callable ``key`` sees that row)."""
        sel = (which or Job()) & job(**overrides)
        return Ref(self.report, key, sel.overrides, one=True)

    def every_job(self, key: Callable[[pd.DataFrame], Any]) -> Ref:
        """What ``key`` returns for the whole report.csv (an aggregate over the sweep's jobs)."""
        return Ref(self.report, key)

    def number(self, which: Job) -> int:
        """The job number (multirun/NAME/<N>) of the job ``which`` selects."""
        rows = select(self.report, which.overrides)
        if len(rows) != 1:
            raise LookupError(f"{self.report}: {which} selects {len(rows)} jobs, not 1")
        return int(rows["job"].iloc[0])

    def job_ref(self, which: Job, suffix: str, key: str | Callable[[pd.DataFrame], Any], **where: Any) -> Ref:
        """A value of the job's own file ``job<N>_<suffix>`` (``loo.csv``, ``ihvp.csv``)."""
        return Ref(JobFile(self, which, suffix), key, tuple(where.items()))


def paired_mean_ci(d: Any) -> str:
    """``+m [+lo, +hi]``: the mean of the paired differences ``d`` and its 95% percentile-bootstrap interval (1,000
    resamples, seed 0), to two decimals."""
    import numpy as np
    from scipy.stats import bootstrap
    ci = bootstrap((np.asarray(d),), np.mean, n_resamples=1000, method="percentile",
                   random_state=np.random.default_rng(0)).confidence_interval
    return f"{fmt(np.mean(d), '+.2')} [{fmt(ci.low, '+.2')}, {fmt(ci.high, '+.2')}]"


def paired(sweep: Sweep, a: Job, b: Job, damping: str = "0.001", measurement: str = "loss",
           template: str = "{:.3} [{:.3}, {:.3}]", file: str = "lds_paired.csv") -> Cell:
    """Job ``a``'s LDS minus job ``b``'s, both at ``damping``, paired over queries, with its 95% interval, from the
    sweep's ``lds_paired.csv``. The report writes each pair once, in job order; where it has ``b`` before ``a`` the
    same row is read negated (the difference and its interval's ends swapped)."""
    src = sweep.file(file)

    def part(k: str) -> Callable[[pd.DataFrame], Any]:
        def get(df: pd.DataFrame) -> Any:
            na, nb = sweep.number(a), sweep.number(b)
            pair = {"damping_a": damping, "damping_b": damping}
            fwd = select(src, [("measurement", measurement), ("job_a", na), ("job_b", nb), *pair.items()])
            rev = select(src, [("measurement", measurement), ("job_a", nb), ("job_b", na), *pair.items()])
            if len(fwd) + len(rev) != 1:
                raise LookupError(f"{src}: {len(fwd) + len(rev)} rows pair {a} with {b} ({measurement}, "
                                  f"λ = {damping}), not 1")
            if len(fwd):
                return fwd[k].iloc[0]
            return -rev[{"diff": "diff", "ci_low": "ci_high", "ci_high": "ci_low"}[k]].iloc[0]
        return get

    return cell(template, *(Ref(src, part(k), via=(sweep.report,)) for k in ("diff", "ci_low", "ci_high")))


# ----------------------------------------------------------------------------------------------------------------
# formatting


def fmt(x: Any, spec: str) -> str:
    """``x`` in the format ``spec`` (see the module docstring)."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or (isinstance(x, str) and spec and x == ""):
        return MISSING
    if not spec:
        return str(x)
    x = float(x)
    if spec.startswith("+"):  # an explicit sign on differences: +1.2, -0.3, +0.0
        text = fmt(x, spec[1:])
        return text if text.startswith("-") else f"+{text}"
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


def ph(f: str, bold: bool = False) -> str:
    """The template placeholder of one value in format ``f`` (bold: ``**...**``)."""
    p = "{:" + f + "}"
    return f"**{p}**" if bold else p


# ----------------------------------------------------------------------------------------------------------------
# tables, numbers and the sections that hold them

Row = Sequence[str | Ref | Cell]  # one table row: literal text, a value printed as text, or a formatted cell


class SpecError(LookupError):
    """A table's value cannot be found: the message names the table, the file and the selection."""


@dataclass
class Table:
    """A generated table: its header and rows (or a function building them from the files, called when the table
    is rendered); every cell is literal text, a :class:`Ref` (printed as text) or a :class:`Cell`."""

    name: str
    header: Sequence[str]
    rows: Sequence[Row] | Callable[[], Sequence[Row]]
    note: str = field(default="")  # what the table is, for --sources

    def built_rows(self) -> Sequence[Row]:
        try:
            return self.rows() if callable(self.rows) else self.rows
        except LookupError as e:
            raise SpecError(f"table {self.name}: {e.args[0] if e.args else e}") from e

    def refs(self) -> list[Ref]:
        return [r for row in self.built_rows() for c in row
                for r in (c.refs if isinstance(c, Cell) else (c,) if isinstance(c, Ref) else ())]

    def sources(self) -> list[str]:
        """The committed files this table reads."""
        try:
            return sorted({s for r in self.refs() for s in r.sources()})
        except SpecError:
            raise
        except LookupError as e:
            raise SpecError(f"table {self.name}: {e.args[0] if e.args else e}") from e

    def frame(self) -> pd.DataFrame:
        """The table as strings, one column per header entry."""
        def text(c: str | Ref | Cell) -> str:
            try:
                return c.render() if isinstance(c, Cell) else fmt(c.value(), "") if isinstance(c, Ref) else c
            except LookupError as e:
                raise SpecError(f"table {self.name}: {e.args[0] if e.args else e}") from e

        rows = self.built_rows()
        for row in rows:
            if len(row) != len(self.header):
                raise ValueError(f"table {self.name}: a row has {len(row)} cells for {len(self.header)} columns")
        return pd.DataFrame([[text(c) for c in row] for row in rows], columns=list(self.header))

    def markdown(self) -> str:
        df = self.frame()

        def line(cells: Sequence[str]) -> str:
            return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"
        lines = [line(df.columns), "|" + "---|" * len(df.columns)] + [line(r) for r in df.itertuples(index=False)]
        return "\n".join(lines) + "\n"


Number = Cell | Callable[[], str]

TABLES: dict[str, Table] = {}  # every spec module's tables, by marker name
NUMBERS: dict[str, Number] = {}  # every spec module's prose numbers, by marker name


@dataclass
class Section:
    """The specs of one RESULTS.md section, one module of ``experiments/table_specs/`` (``SECTION =
    Section("4. LDS")`` there): the tables it generates and the numbers its prose quotes. Names are unique over
    all sections."""

    title: str
    tables: dict[str, Table] = field(default_factory=dict)
    numbers: dict[str, Number] = field(default_factory=dict)

    def table(self, name: str, header: Sequence[str], rows: Sequence[Row] | Callable[[], Sequence[Row]],
              note: str = "") -> Table:
        """Register the table of marker ``<!-- table:NAME -->``."""
        if name in TABLES:
            raise ValueError(f"two tables named {name}")
        self.tables[name] = TABLES[name] = Table(name, header, rows, note)
        return TABLES[name]

    def number(self, name: str, value: Number) -> Number:
        """Register a number of the section's prose (a :class:`Cell`, e.g. ``cell("{:.3}", S("lds/mean",
        solver="ekfac"))``, or a function returning the text), for RESULTS.md's ``<!-- num:NAME -->`` markers
        once :func:`render` fills them."""
        if name in NUMBERS:
            raise ValueError(f"two numbers named {name}")
        self.numbers[name] = NUMBERS[name] = value
        return value


def number_text(name: str) -> str:
    """The text of prose number ``name``."""
    v = NUMBERS[name]
    return v.render() if isinstance(v, Cell) else v()


def load_specs(modules: Sequence[str]) -> dict[str, Section]:
    """Import the spec modules ``table_specs.<m>`` (in RESULTS.md's order), which register their tables; every
    module of experiments/table_specs/ must be listed."""
    present = {p.stem for p in SPECS.glob("*.py") if p.stem != "__init__"}
    if missing := sorted(present - set(modules)):
        raise ValueError(f"table_specs/{missing[0]}.py is not listed in table_specs/__init__.py's MODULES")
    if str(SPECS.parent) not in sys.path:
        sys.path.insert(0, str(SPECS.parent))
    return {m: importlib.import_module(f"table_specs.{m}").SECTION for m in modules}


# ----------------------------------------------------------------------------------------------------------------
# RESULTS.md

MARKER = re.compile(r"^(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)^(<!-- /table -->)$", re.DOTALL | re.MULTILINE)


def markers(text: str) -> list[str]:
    """The names of the generated tables in ``text``, in order."""
    return [m["name"] for m in MARKER.finditer(text)]


def current(text: str) -> dict[str, str]:
    """What ``text`` has between each pair of markers."""
    return {m["name"]: m["body"] for m in MARKER.finditer(text)}


NUM = re.compile(r"<!-- num:(?P<name>[\w.-]+) -->(?P<body>.*?)<!-- /num -->", re.DOTALL)


def numbers_in(text: str) -> list[str]:
    """The names of the prose numbers (``<!-- num:NAME -->...<!-- /num -->``) in ``text``, in order."""
    return [m["name"] for m in NUM.finditer(text)]


def render(text: str) -> str:
    """``text`` with the content between every pair of table markers regenerated, and every prose number
    ``<!-- num:NAME -->...<!-- /num -->`` refilled with :func:`number_text` (KeyError for a marker without spec)."""
    def sub(m: re.Match[str]) -> str:
        if m["name"] not in TABLES:
            raise KeyError(f"RESULTS.md has a marker <!-- table:{m['name']} --> but no spec module has such a table")
        return m.group(1) + TABLES[m["name"]].markdown() + m.group(4)

    def num(m: re.Match[str]) -> str:
        if m["name"] not in NUMBERS:
            raise KeyError(f"RESULTS.md has a marker <!-- num:{m['name']} --> but no spec module has such a number")
        try:
            value = number_text(m["name"])
        except LookupError as e:
            raise SpecError(f"number {m['name']}: {e.args[0] if e.args else e}") from e
        return f"<!-- num:{m['name']} -->{value}<!-- /num -->"

    return NUM.sub(num, MARKER.sub(sub, text))


def problems(text: str) -> list[str]:
    """Markers without a spec, specs without a marker, table markers used twice; the same for the prose numbers'
    ``<!-- num:NAME -->`` markers and ``NUMBERS`` (a number may be quoted more than once)."""
    names = markers(text)
    out = [f"marker without a spec in experiments/table_specs/: {n}" for n in names if n not in TABLES]
    out += [f"spec without a marker in RESULTS.md: {n}" for n in TABLES if n not in names]
    out += [f"marker used more than once: {n}" for n in sorted({n for n in names if names.count(n) > 1})]
    nums = numbers_in(text)
    out += [f"number marker without a spec in experiments/table_specs/: {n}" for n in nums if n not in NUMBERS]
    out += [f"number spec without a marker in RESULTS.md: {n}" for n in NUMBERS if n not in nums]
    if text.count("<!-- num:") != len(nums) or text.count("<!-- /num -->") != len(nums):
        out.append("unbalanced or malformed <!-- num:NAME --> / <!-- /num --> markers")
    lines = text.splitlines()
    if (sum(x.startswith("<!-- table:") for x in lines) != len(names)
            or sum(x.startswith("<!-- /table -->") for x in lines) != len(names)):
        out.append("unbalanced or malformed <!-- table:NAME --> / <!-- /table --> markers")
    return out


def main(argv: list[str] | None = None, description: str = "") -> int:
    """The command line of experiments/tables.py."""
    p = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
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
    if bad:  # (a spec whose files now exist, e.g. a finished run's numbers, needs its marker in the prose first)
        print(f"{a.file} was not {'checked' if a.check else 'written'}: mend the markers or specs above first",
              file=sys.stderr)
        return 1
    new = render(text)
    if a.check:
        if new != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                       str(a.file), "generated from the committed files"))
            return 1
        print(f"{a.file}: {len(markers(text))} generated tables and {len(numbers_in(text))} prose numbers up to date")
        return 0
    if new != text:
        a.file.write_text(new)
    print(f"{a.file}: {len(markers(text))} generated tables and {len(numbers_in(text))} prose numbers written")
    return 0

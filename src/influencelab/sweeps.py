"""``load_sweep(dir)``: every job of a (multi)run directory as a pandas DataFrame, one row per job and damping,
read from the job directories' files without loading any model or data (``influencelab-report``'s input); one run,
loaded, is :mod:`influencelab.run`'s."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import InfluenceLabError
from .metric_names import damping_value, parse_metric_name

if TYPE_CHECKING:
    import pandas as pd



def find_jobs(root: Path) -> list[Path]:
    """Job directories under ``root`` (itself included), sorted naturally: those with ``metrics.json``, those
    that stopped on bad input before writing any (``error.txt``), and those that stopped before any stage
    finished (killed, crashed, or still running: Hydra's ``.hydra/config.yaml`` and the job's log, no metrics)."""
    jobs = {p.parent for p in root.rglob("metrics.json")} | {p.parent for p in root.rglob("error.txt")}
    jobs |= {p.parent.parent for p in root.rglob(".hydra/config.yaml") if any(p.parent.parent.glob("*.log"))}
    # numbers in order (2 before 10), then other names (a second sweep's x0 in the same folder)
    return sorted(jobs, key=lambda p: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in p.relative_to(root).parts])


def launched_jobs(root: Path) -> int | None:
    """How many jobs the multirun in ``root`` launches, from its ``multirun.yaml`` (Hydra's basic sweeper: the
    product of the sizes of its sweeps, jobs ``0`` to ``n - 1``); ``None`` when unknown (no such file, another
    sweeper)."""
    path = Path(root) / "multirun.yaml"
    try:
        hydra_cfg = (yaml.safe_load(path.read_text()) or {}).get("hydra") or {}
        sweeper = hydra_cfg.get("sweeper") or {}
        if not str(sweeper.get("_target_", "")).endswith(".BasicSweeper"):
            return None
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = sweeper.get("params") or {}
        overrides = [*((hydra_cfg.get("overrides") or {}).get("task") or []), *(f"{k}={v}" for k, v in params.items())]
        n = 1
        for o in OverridesParser.create().parse_overrides([str(x) for x in overrides]):
            if o.is_sweep_override():
                if not o.is_discrete_sweep():
                    return None
                n *= len(list(o.sweep_iterator()))
        return n
    except Exception:  # noqa: BLE001 (no file, or one this cannot read: the count is unknown)
        return None


#: the error of a job that a multirun launches but that never started (a sweep stopped before it)
NEVER_STARTED = ("did not finish: never started (the sweep stopped before launching it: a killed worker, an "
                 "interrupted command); rerun the same command")


def never_started(root: Path, jobs: list[Path] | None = None) -> list[Path]:
    """The job directories a multirun launches (:func:`launched_jobs`) that :func:`find_jobs` does not find: the
    jobs of a sweep that stopped before launching them (a SIGKILLed joblib worker stops the whole pool)."""
    root = Path(root)
    n = launched_jobs(root)
    if not n:
        return []
    found = {p.relative_to(root).as_posix() for p in (find_jobs(root) if jobs is None else jobs)}
    return [root / str(i) for i in range(n) if str(i) not in found]


def _job_config(job: Path) -> dict[str, Any]:
    path = job / ".hydra" / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def unfinished_stages(job: Path, metrics: dict[str, Any] | None = None) -> list[str]:
    """The configured stages (``.hydra/config.yaml``'s ``stages``) that the job did not finish: every finished
    stage logs ``mem/<stage>_peak_rss_mb`` (the CLI's loop, after the stage) or ``time/<stage>_s``. ``[]`` for a
    job that finished, one with no config, and a ``score.partition`` job (it stops after caching its share)."""
    cfg = _job_config(job)
    if (cfg.get("score") or {}).get("partition") not in (None, "", "null"):
        return []
    m = job_metrics(job) if metrics is None else metrics
    return [s for s in cfg.get("stages") or []
            if f"mem/{s}_peak_rss_mb" not in m and f"time/{s}_s" not in m]


#: a log line worth quoting for a job that stopped: an error, a traceback's last line, a kill
_ERROR_LINE = re.compile(r"\[(ERROR|CRITICAL)\]|Traceback|\w+(Error|Exception)\b|\bKilled\b|^error:")


def last_error_line(job: Path) -> str | None:
    """The last line of the job's log (``*.log``, Hydra's ``<job name>.log``) that reads as an error (``[ERROR]``,
    an exception's name, ``Killed``), else its last line; ``None`` without a log."""
    lines = [ln.strip() for log in sorted(job.glob("*.log")) for ln in log.read_text(errors="replace").splitlines()
             if ln.strip()]
    if not lines:
        return None
    return next((ln for ln in reversed(lines) if _ERROR_LINE.search(ln)), lines[-1])


def job_status(job: Path, metrics: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """``("ok", None)``, ``("failed", message)`` (stopped on bad input: ``error.txt``) or ``("incomplete",
    message)``: a job that did not finish its configured stages (killed, crashed, or still running), the message
    naming the stage it stopped in and its log's last error line (or last line)."""
    m = job_metrics(job) if metrics is None else metrics
    if m.get("error"):
        return "failed", str(m["error"])
    left = unfinished_stages(job, m)
    if not left:
        return "ok", None
    line = last_error_line(job)
    return "incomplete", (f"did not finish: stopped in stage {left[0]} (killed, crashed or still running)"
                          + (f"; last log line: {line}" if line else ""))


def job_overrides(job: Path) -> dict[str, str]:
    """The job's command-line overrides, ``key -> value`` as written (values unescaped: a sweep job's
    ``last\\:1`` is ``last:1``)."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = re.sub(r"\\(.)", r"\1", value)
    return out


def job_choices(job: Path) -> dict[str, Any]:
    """The job's config-group choices (``dataset``, ``model``, ``solver``, ``experiment``, ...; Hydra's own
    ``hydra/*`` groups left out), from ``.hydra/hydra.yaml``."""
    path = job / ".hydra" / "hydra.yaml"
    if not path.exists():
        return {}
    choices = ((yaml.safe_load(path.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices")) or {}
    return {k: v for k, v in choices.items() if not str(k).startswith("hydra/")}


def job_metrics(job: Path) -> dict[str, Any]:
    """``metrics.json`` (``{}`` without one), plus ``error``: the one-line message of a job that stopped on bad
    input (``error.txt``)."""
    path = job / "metrics.json"
    m = json.loads(path.read_text()) if path.exists() else {}
    if (job / "error.txt").exists():
        m["error"] = (job / "error.txt").read_text().strip()
    return m


def _job_first_damping(job: Path) -> float | str | None:
    """The job's ``solver.damping`` (the first of a list): the damping its metrics without ``@`` are at."""
    path = job / ".hydra" / "config.yaml"
    if not path.exists():
        return None
    return first_damping(((yaml.safe_load(path.read_text()) or {}).get("solver") or {}).get("damping"))


def first_damping(d: Any) -> float | str | None:
    """The first damping of ``d``: a damping, a list of them, or a list as an override writes it
    (``"[1e-3,1]"``)."""
    if isinstance(d, str) and d.strip().startswith("["):
        d = d.strip().strip("[]").split(",")
    if isinstance(d, (list, tuple)):
        d = d[0] if len(d) else None
    return damping_value(d)


def split_metric(name: str) -> tuple[str, float | str] | None:
    """``(name without its @<damping>, damping)`` for a per-damping metric name, else ``None``:
    ``"mislabel/self_influence@0.1/recall@10"`` -> ``("mislabel/self_influence/recall@10", 0.1)``
    (:func:`~influencelab.metric_names.parse_metric_name`)."""
    base, damping = parse_metric_name(name)
    return None if damping is None else (base, damping)


def split_dampings(frame: pd.DataFrame, first: Any = None) -> pd.DataFrame:
    """``frame`` (one row per job, metric columns as the runs name them) with one row per job and damping for
    the jobs that have per-damping metrics (``prefix/name@<damping>``): those columns become ``prefix/name`` on
    the row of their damping, in a new ``damping`` column (NaN on the rows of the other jobs); every other column
    is repeated on each of the job's rows.

    Several stages log their run's first damping without the ``@`` (``lds/mean`` beside ``lds/mean@0.1``;
    ``mislabel/self_influence/*`` beside ``mislabel/self_influence@0.1/*``): ``first`` (per row, aligned with
    ``frame``'s rows: a column name, a sequence or a scalar; the job's ``solver.damping`` or the first of its
    list) puts those values on that damping's row. Where it is unknown they are repeated on each row, below the
    values a damping has under its own name. A job without per-damping metrics gets ``damping`` = its ``first``."""
    import pandas as pd  # on use: `import influencelab` stays light
    wide = frame.reset_index(drop=True).rename_axis("_row")
    if isinstance(first, str) and first in wide.columns:
        first = wide[first]
    firsts = pd.Series(first.tolist() if hasattr(first, "tolist") else first, index=wide.index, dtype=object)
    firsts = firsts.map(first_damping)
    tagged = {c: t for c in wide.columns if isinstance(c, str) and (t := split_metric(c)) is not None}
    names = {name for name, _ in tagged.values()}
    plain = [c for c in wide.columns if c in names]  # the first damping's values, under the bare name

    long = wide[list(tagged)].reset_index().melt(id_vars="_row", var_name="_column")
    long = long[long["value"].notna()]
    long["damping"] = long["_column"].map(lambda c: tagged[c][1])
    long["metric"] = long["_column"].map(lambda c: tagged[c][0])
    per = long.pivot(index=["_row", "damping"], columns="metric", values="value")  # [(job, damping), metric]
    split_rows = per.index.unique("_row")
    known = [r for r in split_rows if firsts[r] is not None]
    if plain and known:  # the first damping's bare-named values, on its row (added where it has no other)
        at_first = wide.loc[known, plain].assign(damping=firsts[known]).set_index("damping", append=True)
        with warnings.catch_warnings():  # dampings "auto" and floats in one index: pandas cannot sort it (harmless)
            warnings.filterwarnings("ignore", "The values in the array are unorderable", RuntimeWarning)
            per = per.combine_first(at_first)
    rest = wide.drop(columns=list(tagged)).astype(dict.fromkeys(plain, object))
    rest.loc[known, plain] = None  # placed on the first damping's row above: not repeated on the others
    per = per.reset_index()  # columns _row, damping, the per-damping metrics; the job's other columns below
    split = per.combine_first(rest.loc[per["_row"]].reset_index(drop=True))
    out = pd.concat([split, rest.drop(index=split_rows).copy().reset_index()], ignore_index=True)  # (.copy(): one
    # block, else reset_index's insert warns of a fragmented frame)
    if "damping" not in out:
        out["damping"] = float("nan")
    # a job with one damping (no per-damping metrics): its row is at that damping (the job's solver.damping)
    single = out["damping"].isna() & out["_row"].map(lambda r: firsts[r] is not None)
    if single.any():
        out["damping"] = out["damping"].astype(object)
        out.loc[single, "damping"] = out.loc[single, "_row"].map(firsts)
    order = pd.to_numeric(out["damping"], errors="coerce")
    out = out.copy()  # one block, not a column per insert above
    out = out.assign(_order=order).sort_values(["_row", "_order"], kind="stable", na_position="last")
    n_lead = next((i for i, c in enumerate(wide.columns) if "/" in str(c)), len(wide.columns))
    lead = [c for c in wide.columns[:n_lead] if c not in tagged and c != "error"]  # job, overrides, choices
    tail = ["error"] if "error" in out else []
    metrics = sorted(c for c in out.columns if c not in {*lead, *tail, "damping", "_row", "_order"})
    return out[[*lead, "damping", *metrics, *tail]].reset_index(drop=True).infer_objects()


#: what :func:`load_sweep` puts where a job did not log a metric, unless told otherwise
MISSING = float("nan")


def load_sweep(sweep_dir: str | Path, by_damping: bool = True, missing: Any = MISSING) -> pd.DataFrame:
    """Every job of a Hydra multirun directory (or of any directory of runs, or one run) as a pandas DataFrame;
    or the jobs of a ``report.csv`` that ``influencelab-report`` wrote (a sweep kept as one file: the same
    columns, read back).

    Columns: ``job`` (its directory relative to ``sweep_dir``: ``"0"``, ``"1"``, ...), the job's overrides
    (``.hydra/overrides.yaml``, one column per key, values as written), its config-group choices (``dataset``,
    ``model``, ``solver``, ``experiment``, ... from ``.hydra/hydra.yaml``), ``damping``, every metric of its
    ``metrics.json``, and ``error`` (the message of a job that stopped on bad input, which has no metrics, or of
    one that did not finish its stages: killed, crashed or still running, :func:`job_status`, or that the
    multirun launches but never started, :data:`NEVER_STARTED`; NaN for the others).

    A job that scored several dampings (a ``solver.damping`` list; metrics named ``prefix/name@<damping>``, e.g.
    ``ihvp/rel_error@0.001``, ``solver/iterations@0.01``, ``mislabel/self_influence@1.0/recall@10``) has one row
    per damping, its metrics under their names without the ``@<damping>`` (its metrics without a damping
    repeated on each of its rows); a job without per-damping metrics has one row, at its ``solver.damping``
    (NaN where the job has none, e.g. failed before writing its config).

    ``by_damping=False``: one row per job, the metrics as the runs name them. There, ``missing`` is what a cell
    holds where the job did not log that metric (and where it has no such override or choice): NaN by default,
    so that a metric logged as NaN (a diverged solver's error) and one never logged look alike; pass e.g.
    ``missing=None`` to tell them apart (the frame is then of dtype ``object``, values as the runs wrote them;
    ``influencelab-report`` writes it so: ``nan`` = logged as NaN, empty = not logged)."""
    import pandas as pd  # on use: `import influencelab` stays light
    root = Path(sweep_dir)
    if root.is_file() and root.suffix == ".csv":
        return _load_report(root, by_damping)
    if not root.is_dir():
        raise InfluenceLabError(f"{root} is neither a directory of runs nor a report.csv")
    jobs = find_jobs(root)
    unstarted = set(never_started(root, jobs))
    if not jobs:
        raise InfluenceLabError(f"no runs under {root} (no job directory with metrics.json or error.txt)")
    if unstarted:  # in their place among the others
        jobs = sorted([*jobs, *unstarted], key=lambda p: [(0, int(t), "") if t.isdigit() else (1, 0, t)
                                                          for t in p.relative_to(root).parts])
    records, okeys, ckeys, mkeys, firsts = [], [], [], [], []
    for job in jobs:
        o, c, m = job_overrides(job), job_choices(job), job_metrics(job)
        # bad input (error.txt), stopped before its last stage (killed, crashed), or never started
        error = NEVER_STARTED if job in unstarted else job_status(job, m)[1]
        m.pop("error", None)
        okeys += [k for k in o if k not in okeys]
        ckeys += [k for k in c if k not in ckeys and k not in okeys]
        mkeys += [k for k in m if k not in mkeys]
        records.append({"job": str(job.relative_to(root)), **c, **o, **m, "error": error})
        firsts.append(_job_first_damping(job))
    columns = ["job", *okeys, *[k for k in ckeys if k not in okeys], *sorted(mkeys), "error"]
    if by_damping or missing is MISSING:
        wide = pd.DataFrame.from_records(records, columns=columns)
        return split_dampings(wide, firsts) if by_damping else wide
    return pd.DataFrame([[r.get(k, missing) for k in columns] for r in records], columns=columns, dtype=object)


def _load_report(path: Path, by_damping: bool) -> pd.DataFrame:
    """A ``report.csv`` as :func:`load_sweep` gives a directory (``job`` and overrides as text, empty cells
    NaN). Its first damping per job, for the metrics logged without ``@``: the ``solver.damping`` column, where
    the sweep overrode it."""
    from .files import read_csv

    again = f"influencelab-report {path.parent}"  # (what rewrites it from the job directories)
    lead = [c for c in read_csv(path, again, nrows=0).columns if "/" not in c]  # job, overrides, choices, error
    wide = read_csv(path, again, dtype=dict.fromkeys(lead, str))
    if not by_damping:
        return wide
    return split_dampings(wide, "solver.damping" if "solver.damping" in wide else None)

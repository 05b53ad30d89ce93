"""``influencelab-report DIR``: turn a run or multirun directory into a table (markdown + CSV) and plots.

Every job directory under DIR (one with ``metrics.json``) becomes a row: its Hydra overrides
(``.hydra/overrides.yaml``) as columns, then every metric. Comparison plots are drawn when the metrics
are there: IHVP error vs damping per solver, detection curves across runs, LDS per solver with intervals.
The same jobs as a pandas DataFrame (one row per job and damping): :func:`influencelab.load_sweep`.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any

from .run import find_jobs, job_metrics
from .run import job_overrides as overrides  # the job's command-line overrides, key -> value


def collect(root: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows (one per job, the metrics as the runs name them) and the column order: ``job``, override keys,
    metric keys (and ``error`` among them for a job that stopped on bad input). Plain values, not a DataFrame:
    the table tells a metric a job logged as NaN (``nan``) from one it does not have (empty), and the command
    needs no pandas; :func:`influencelab.load_sweep` reads the same directories into one."""
    rows, okeys, mkeys = [], [], []
    for job in find_jobs(root):
        o, m = overrides(job), job_metrics(job)
        okeys += [k for k in o if k not in okeys]
        mkeys += [k for k in m if k not in mkeys]
        rows.append({"job": str(job.relative_to(root)) or ".", **o, **m})
    return ["job", *okeys, *sorted(mkeys)], rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |\n" for r in rows)


def labels(rows: list[dict[str, Any]], exclude: tuple[str, ...] = (), same: str | None = None) -> list[str]:
    """A short legend label per row: only the overrides that differ between ``rows`` (``same`` when none
    does; default: the job number)."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if "/" not in k and k != "job" and k not in exclude]
    varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]
    return [", ".join(f"{k}={r.get(k)}" for k in varying) or (same if same is not None else f"job {r['job']}")
            for r in rows]


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(root: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Comparison figures from whatever metrics the jobs have: each stage module draws its own (IHVP error vs
    damping, detection curves, LDS with intervals, unlearning against retraining by set size)."""
    from .stages import load_all

    out: list[Path] = []
    for st in load_all().values():
        if st.report is not None:
            out += st.report(root, rows, root / "report_figures")
    return out


def report(root: Path) -> tuple[Path, Path, list[Path]]:
    """Write ``report.md`` and ``report.csv`` (and figures) into ``root``."""
    columns, rows = collect(root)
    if not rows:
        raise SystemExit(f"error: no runs (metrics.json) under {root}")
    md, csv_path = root / "report.md", root / "report.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    figs = plots(root, rows)
    md.write_text(f"# Report: {root}\n\n{len(rows)} run(s).\n\n" + markdown(columns, rows)
                  + "".join(f"\n![{p.stem}]({p.relative_to(root)})\n" for p in figs))
    return md, csv_path, figs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="influencelab-report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a run or multirun directory")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"error: {args.dir} is not a directory", file=sys.stderr)
        raise SystemExit(2)
    md, csv_path, figs = report(args.dir)
    print(md.read_text() if md.stat().st_size < 20_000 else f"wrote {md}")
    print(f"wrote {md}, {csv_path}" + "".join(f", {p}" for p in figs))


if __name__ == "__main__":
    main()

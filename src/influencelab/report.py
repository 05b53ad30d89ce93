"""``influencelab-report DIR``: turn a run or multirun directory into a table (markdown + CSV) and plots.

Every job directory under DIR (one with ``metrics.json``) becomes a row of :func:`influencelab.load_sweep`'s
one-row-per-job frame: its Hydra overrides and config-group choices, then every metric (``nan`` where the job
logged NaN, empty where it logged nothing). ``load_sweep("DIR/report.csv")`` reads the table back. Comparison
plots are drawn when the metrics are there: IHVP error vs damping per solver, detection curves across runs, LDS
per solver with intervals.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InfluenceLabError
from .metric_names import parse_metric_name
from .registry import STAGES
from .stages import load_all
from .sweeps import load_sweep

if TYPE_CHECKING:
    import pandas as pd


def table(root: Path) -> pd.DataFrame:
    """One row per job under ``root`` (:func:`influencelab.load_sweep`, ``by_damping=False``): ``job``, the
    overrides, the choices, the metrics as the runs name them, ``error``; ``None`` where a job has no such
    column, a logged NaN as NaN."""
    frame = load_sweep(root, by_damping=False, missing=None)
    if Path(root).is_file():  # a report.csv: its empty cells are what the jobs did not log (as in a directory)
        frame = frame.astype(object).where(frame.notna(), None)
    if "error" in frame and frame["error"].isna().all():
        frame = frame.drop(columns="error")
    return frame


def collect(root: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The report's column order and its rows as plain dicts (what the stages' plots read): each job's
    columns without those it does not have."""
    frame = table(root)
    return list(frame.columns), _rows(frame)


def _rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if v is not None} for r in frame.to_dict("records")]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def markdown(frame: pd.DataFrame, fmt=_fmt) -> str:
    """``frame`` as a markdown table, each cell through ``fmt``."""
    head = "| " + " | ".join(map(str, frame.columns)) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(v) for v in row) + " |\n"
                          for row in frame.itertuples(index=False))


def plots(root: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Comparison figures from whatever metrics the jobs have: each stage module draws its own (IHVP error vs
    damping, detection curves, LDS with intervals, unlearning against retraining by set size), as registered
    (:func:`report` loads the stage modules)."""
    out: list[Path] = []
    for st in STAGES.values():
        if st.report is not None:
            out += st.report(root, rows, root / "report_figures")
    return out


def report(root: Path) -> tuple[Path, Path, list[Path]]:
    """Write ``report.md`` and ``report.csv`` (and figures) into ``root``; where jobs scored a damping list, also
    ``report_by_damping.csv``: :func:`influencelab.load_sweep`'s long form, a ``damping`` column and one row per
    job and damping (a pivot or a line chart against damping reads it directly).

    ``root`` may also be a ``report.csv`` (a sweep kept as one file, e.g. under experiments/results/): then
    ``report.md`` and the figures are redrawn beside it from that file alone (the file itself is left as it is;
    figures that need the job directories' own tables are skipped)."""
    load_all()  # every stage module registers its figure
    from_file = root.is_file()
    frame = table(root)
    if from_file:
        csv_path = root
        root = root.parent
    else:
        csv_path = root / "report.csv"
        # a logged NaN as "nan", a metric the job did not log as an empty cell
        frame.map(lambda v: "nan" if isinstance(v, float) and math.isnan(v) else v).to_csv(csv_path, index=False)
        # damping lists: also one row per job and damping
        if any(parse_metric_name(str(c))[1] is not None for c in frame.columns):
            load_sweep(root).to_csv(root / "report_by_damping.csv", index=False)
    md = root / "report.md"
    figs = plots(root, _rows(frame))  # the jobs read once, above
    md.write_text(f"# Report: {root}\n\n{len(frame)} run(s).\n\n" + markdown(frame)
                  + "".join(f"\n![{p.stem}]({p.relative_to(root)})\n" for p in figs))
    return md, csv_path, figs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="influencelab-report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a run or multirun directory, or a report.csv written by this command")
    args = parser.parse_args(argv)
    if not (args.dir.is_dir() or (args.dir.is_file() and args.dir.suffix == ".csv")):
        print(f"error: {args.dir} is neither a directory nor a report.csv", file=sys.stderr)
        raise SystemExit(2)
    try:
        md, csv_path, figs = report(args.dir)
    except InfluenceLabError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(md.read_text() if md.stat().st_size < 20_000 else f"wrote {md}")
    print(f"wrote {md}, {csv_path}" + "".join(f", {p}" for p in figs))


if __name__ == "__main__":
    main()

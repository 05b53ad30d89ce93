"""``influencelab-report DIR``: turn a run or multirun directory into a table (markdown + CSV) and plots.

Every job directory under DIR becomes a row of :func:`influencelab.load_sweep`'s one-row-per-job frame in
``report.csv``: its Hydra overrides and config-group choices, then every metric (``nan`` where the job logged NaN,
empty where it logged nothing), and ``error`` for a job that failed or did not finish (killed, crashed: its log's
last error line). ``load_sweep("DIR/report.csv")`` reads the table back; ``report_by_damping.csv`` is its long
form (one row per job and damping).

``report.md`` is for reading: the failed and unfinished jobs with their errors, then a compact table
(``report_compact.csv``: one row per job and damping, the settings that differ between jobs and the key metrics
only; the settings every job shares in one line above it), then, where jobs scored with different solvers on the
same trained model, whether their scores agree (:mod:`influencelab.compare`: Spearman ρ and top-k overlap per
damping against the most accurate converged solver, every pair in ``report_agreement.csv``, the figure
``report_figures/agreement.png``), then the stages' comparison figures (IHVP error and time vs damping per solver,
detection curves, LDS with intervals, ...).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InfluenceLabError
from .files import atomic_write_text, read_csv, write_csv
from .metric_names import damping_value, parse_metric_name
from .registry import STAGES
from .stages import load_all
from .sweeps import find_jobs, load_sweep

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


def _fmt_blank(v: Any) -> str:
    """A cell of the readable tables: as :func:`_fmt`, a missing value (NaN) blank."""
    return "" if isinstance(v, float) and math.isnan(v) else _fmt(v)


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


#: the metrics of the compact table, in order (shell patterns; those no job logged are left out)
KEY_METRICS = ("train/test_accuracy", "train/test_r2", "time/*", "solver/solve_s", "solver/converged",
               "solver/rel_residual_max", "solver/iterations", "ihvp/rel_error", "ihvp/time_s", "ihvp/rel_residual",
               "ihvp/ref_converged",
               "mislabel/self_influence/recall@10", "mislabel/self_influence/roc_auc", "mislabel/loss/recall@10",
               "lds/mean", "lds_margin/mean", "loo/spearman", "unlearn/edited/test_accuracy",
               "unlearn/retrained/test_accuracy", "select/damping", "select/modules", "agree/reference",
               "agree/pairwise_spearman", "agree/pairwise_top_k", "agree/self_spearman", "agree/self_top_k")


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v.strip() == "")


def compact(long: pd.DataFrame, agree: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The readable table: ``long`` (:func:`influencelab.load_sweep`'s one row per job and damping) with only
    ``job``, ``status`` (``ok``, ``failed``: bad input, ``incomplete``: stopped before its last stage), the
    settings that differ between jobs, ``damping``, the :data:`KEY_METRICS` someone logged, each job's agreement
    with the reference solver (``agree``: :func:`influencelab.compare.against_reference`) and ``error``; and the
    settings every job shares (``{key: value}``, empty ones left out)."""
    import pandas as pd

    frame = long.copy()
    if agree is not None and len(agree):

        def key(d: Any) -> str:
            return str(damping_value(d))

        # a job without per-damping metrics has one row (its first damping): its other dampings' agreement gets a
        # copy of it (its metrics are the job's, not a damping's)
        have = set(zip(frame["job"].astype(str), frame["damping"].map(key), strict=True))
        extra = [frame[frame["job"].astype(str) == str(r["job"])].iloc[[0]].assign(damping=r["damping"])
                 for r in agree.to_dict("records") if (str(r["job"]), key(r["damping"])) not in have]
        if extra:
            order = {j: i for i, j in enumerate(dict.fromkeys(frame["job"].astype(str)))}
            frame = pd.concat([frame, *extra], ignore_index=True)
            frame = frame.assign(_j=frame["job"].astype(str).map(order),
                                 _d=pd.to_numeric(frame["damping"], errors="coerce"))
            frame = frame.sort_values(["_j", "_d"], kind="stable").drop(columns=["_j", "_d"])
        a = agree.assign(_key=agree["damping"].map(key), job=agree["job"].astype(str)).drop(columns="damping")
        frame = frame.assign(_key=frame["damping"].map(key), job=frame["job"].astype(str))
        frame = frame.merge(a, how="left", on=["job", "_key"]).drop(columns="_key")
    err = frame["error"] if "error" in frame else pd.Series([None] * len(frame), index=frame.index)
    status = err.map(lambda e: "ok" if _blank(e) else "incomplete" if str(e).startswith("did not finish")
                     else "failed")
    settings = [c for c in frame.columns if "/" not in str(c) and c not in ("job", "damping", "error")]
    varying, shared = [], {}
    for c in settings:
        values = {str(v) for v in frame[c] if not _blank(v)}
        if len(values) > 1 or (values and frame[c].map(_blank).any()):
            varying.append(c)
        elif len(values) == 1:
            shared[c] = next(iter(values))
    if frame["damping"].notna().any():
        varying = [c for c in varying if c != "solver.damping"]
        shared.pop("solver.damping", None)
    metrics = [c for pat in KEY_METRICS for c in sorted(fnmatch.filter(map(str, frame.columns), pat))
               if frame[c].map(lambda v: not _blank(v)).any()]
    if frame["job"].nunique() > 1:  # a metric every job logged alike (the shared model's accuracy): in the line
        for c in list(metrics):
            values = {str(v) for v in frame[c]}
            if len(values) == 1 and not c.startswith("agree/"):
                shared[c] = _fmt(frame[c].iloc[0])
                metrics.remove(c)
    out = frame[["job"]].assign(status=status)
    cols = [*varying, *(["damping"] if frame["damping"].notna().any() else []), *dict.fromkeys(metrics)]
    out = pd.concat([out, frame[cols]], axis=1)
    if (status != "ok").any():
        out["error"] = err
    return out.reset_index(drop=True), shared


def _agreement_md(table: pd.DataFrame, notes: list[str]) -> str:
    """The agreement section of report.md: each job against the reference, per pass and damping."""
    from .plots import CROSS, HOLLOW

    ref = table[table["b_is_reference"].astype(bool)]
    kinds = set(ref["reference_kind"])
    text = ("\n## Do the solvers agree?\n\nRank agreement of each job's scores with the reference at the same "
            "damping: Spearman ρ over the training points (pairwise: the mean over queries, and the worst query) "
            "and the overlap of the top k scores. The reference is the most accurate job that scored that pass "
            "and damping: exact or gram > CG converged > LiSSA converged > EK-FAC > K-FAC > unconverged CG/LiSSA > "
            "identity (influencelab.compare). Every pair of jobs: report_agreement.csv.\n")
    if "agreement" in kinds:
        text += ("\n**No exact or converged iterative solver scored some dampings** (reference_kind = agreement "
                 "below): there the numbers measure agreement with the best available solver, not accuracy.\n")
    text += "".join(f"\n- {n}" for n in notes) + ("\n" if notes else "")
    t = ref.assign(converged=ref["a_converged"].map(lambda v: "yes" if v else "**no**"))
    t = t[["pass", "damping", "a", "converged", "b", "reference_kind", "spearman", "spearman_min",
           "top_k_overlap", "k"]].rename(columns={"a": "solver", "b": "reference", "spearman": "Spearman ρ",
                                                  "spearman_min": "worst query ρ", "top_k_overlap": "top-k overlap"})
    t.loc[t["pass"] == "self", "worst query ρ"] = None
    return (text + "\n" + markdown(t, fmt=_fmt_blank) + f"\nIn the figure: {CROSS}; {HOLLOW}; a filled circle: every solve behind "
            "the point converged (or was direct).\n")


def report(root: Path) -> tuple[Path, Path, list[Path]]:
    """Write ``report.md``, ``report.csv`` and ``report_compact.csv`` (and figures) into ``root``; where jobs scored a
    damping list, also ``report_by_damping.csv``: :func:`influencelab.load_sweep`'s long form, a ``damping`` column
    and one row per job and damping (a pivot or a line chart against damping reads it directly); where jobs
    scored the same points with the same model, ``report_agreement.csv`` (:func:`influencelab.compare.compare`)
    and ``report_figures/agreement.png``.

    ``root`` may also be a ``report.csv`` (a sweep kept as one file, e.g. under experiments/results/): then
    ``report.md`` and the figures are redrawn beside it from that file alone (the file itself is left as it is;
    the agreement is read from ``report_agreement.csv`` beside it, if there; figures that need the job
    directories' own tables are skipped)."""

    from .compare import against_reference, compare
    from .plots import agreement_figure, pyplot

    load_all()  # every stage module registers its figure
    from_file = root.is_file()
    frame = table(root)
    notes: list[str] = []
    if from_file:
        csv_path = root
        root = root.parent
        agree_csv = root / "report_agreement.csv"
        agree = read_csv(agree_csv, f"influencelab-report {root}", dtype={"job_a": str, "job_b": str}) \
            if agree_csv.exists() else None
    else:
        csv_path = root / "report.csv"
        # a logged NaN as "nan", a metric the job did not log as an empty cell
        write_csv(frame.map(lambda v: "nan" if isinstance(v, float) and math.isnan(v) else v), csv_path)
        # damping lists: also one row per job and damping
        if any(parse_metric_name(str(c))[1] is not None for c in frame.columns):
            write_csv(load_sweep(root), root / "report_by_damping.csv")
        agree, notes = compare(root, find_jobs(root))
        if len(agree):
            write_csv(agree, root / "report_agreement.csv")
        else:
            agree = None
            (root / "report_agreement.csv").unlink(missing_ok=True)
    long = load_sweep(csv_path if from_file else root)
    small, shared = compact(long, against_reference(agree) if agree is not None else None)
    write_csv(small, root / "report_compact.csv")
    figs = plots(root, _rows(frame))  # the jobs read once, above
    if agree is not None:
        plt = pyplot()
        fig = agreement_figure(agree)
        (root / "report_figures").mkdir(exist_ok=True)
        figs.insert(0, root / "report_figures" / "agreement.png")
        fig.savefig(figs[0], dpi=120)
        plt.close(fig)
    bad = small.drop_duplicates("job")
    bad = bad[bad["status"] != "ok"]
    md = root / "report.md"
    text = f"# Report: {root}\n\n{len(frame)} run(s)"
    text += (f", {len(bad)} of them failed or unfinished.\n" if len(bad) else ".\n")
    if len(bad):
        text += "\n## Failed or unfinished jobs\n\n" + markdown(bad[["job", "status", "error"]])
    text += "\n## Runs\n\n"
    if shared:
        text += "Every job: " + ", ".join(f"{k}={v}" for k, v in shared.items()) + ".\n\n"
    text += markdown(small.drop(columns="error", errors="ignore"), fmt=_fmt_blank)
    text += ("\nAll columns, one row per job: report.csv" + (", per damping: report_by_damping.csv"
                                                            if (root / "report_by_damping.csv").exists() else "")
             + "; this table: report_compact.csv.\n")
    if agree is not None:
        text += _agreement_md(agree, notes)
    elif notes:
        text += "".join(f"\n- {n}" for n in notes) + "\n"
    text += "".join(f"\n![{p.stem}]({p.relative_to(root)})\n" for p in figs)
    atomic_write_text(md, text)
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

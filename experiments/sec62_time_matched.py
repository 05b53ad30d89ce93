"""Section 3's time-matched comparison (issue 29 item 3): the IHVP error each solver has reached when a given wall
time has passed, at every damping, with every other solver's finishing time as a budget.

A direct solver (EK-FAC, K-FAC, Arnoldi, ...) has its one result once its fit + solve time (``time_s`` in
``job<N>_ihvp.csv``) has passed, and nothing before. An iterative one (LiSSA, CG, preconditioned) has, at time T,
the iterate of its last step finished by T: its mean error over the queries after each step, with its time since
the fit began, is in ``job<N>_ihvp_trace.csv`` (the ihvp stage's error trace; tracing time is not counted). Before
its first step it has the zero vector (error 1). Also: the time each iterative solver needed to reach each direct
solver's error (empty when it never did).

    python experiments/sec62_time_matched.py OUT.csv "EK-FAC=ihvp_resnet18_exact/0" "LiSSA=ihvp_resnet18_exact_lissa/0"

Series without a trace are treated as direct, per damping (a series joined from several jobs, ``A/0+B/0``, is
iterative at the dampings whose job recorded a trace). Errors are means over the queries (as the trace records them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"


def load(spec: str) -> tuple[str, pd.DataFrame, pd.DataFrame | None]:
    """``LABEL=SWEEP/JOB`` -> (label, per-damping rows, the error trace or None)."""
    label, _, where = spec.partition("=")
    parts = [part.partition("/")[::2] for part in where.split("+")]  # (SWEEP/JOB, or several joined by +)
    rows = pd.concat([pd.read_csv(RESULTS / sw / f"job{j}_ihvp.csv") for sw, j in parts], ignore_index=True)
    traces = [pd.read_csv(t) for t in (RESULTS / sw / f"job{j}_ihvp_trace.csv" for sw, j in parts) if t.exists()]
    return label, rows, pd.concat(traces, ignore_index=True) if traces else None


def _traced(trace: pd.DataFrame | None, damping: float) -> pd.DataFrame | None:
    """The trace's rows at ``damping`` (None: no trace there: the solver counts as direct at that damping)."""
    if trace is None:
        return None
    t = trace[trace["damping"] == damping]
    return t if len(t) else None


def error_at(rows: pd.DataFrame, trace: pd.DataFrame | None, damping: float, budget: float) -> float:
    """The error a solver has at ``budget`` seconds (NaN: a direct solver not yet finished)."""
    t = _traced(trace, damping)
    if t is not None:
        done = t[t["time_s"] <= budget]
        return float(done["rel_error"].iloc[-1]) if len(done) else 1.0
    r = rows[rows["damping"] == damping].iloc[0]
    return float(r["rel_error"]) if float(r["time_s"]) <= budget else float("nan")


def time_to(trace: pd.DataFrame, damping: float, error: float) -> float:
    """When an iterative solver's error first was at most ``error`` (NaN: never)."""
    t = trace[(trace["damping"] == damping) & (trace["rel_error"] <= error)]
    return float(t["time_s"].iloc[0]) if len(t) else float("nan")


def table(specs: list[str]) -> pd.DataFrame:
    series = [load(s) for s in specs]
    out = []
    dampings = sorted({float(d) for _, rows, _ in series for d in rows["damping"]})
    for lam in dampings:
        present = [(label, rows, trace) for label, rows, trace in series if (rows["damping"] == lam).any()]
        for b_label, b_rows, _ in present:
            b = b_rows[b_rows["damping"] == lam].iloc[0]
            budget, b_err = float(b["time_s"]), float(b["rel_error"])
            for label, rows, trace in present:
                r = rows[rows["damping"] == lam].iloc[0]
                traced = _traced(trace, lam) is not None
                out.append({
                    "damping": lam, "budget_of": b_label, "budget_s": budget, "series": label,
                    "iterative": traced, "rel_error_at_budget": error_at(rows, trace, lam, budget),
                    "final_rel_error": float(r["rel_error"]), "final_time_s": float(r["time_s"]),
                    "time_to_budget_error_s": time_to(trace, lam, b_err) if traced else float("nan"),
                    "ref_converged": bool(r.get("ref_converged", True)),
                })
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the CSV to write")
    ap.add_argument("series", nargs="+", help="LABEL=SWEEP/JOB")
    args = ap.parse_args(argv)
    df = table(args.series)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(df.pivot_table(index=["damping", "budget_of", "budget_s"], columns="series",
                         values="rel_error_at_budget", sort=False).to_string(float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()

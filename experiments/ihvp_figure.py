"""One IHVP error figure (error vs damping and vs wall time, one line per solver) from several sweeps of the same
model, queries and CG references, e.g. the reduced ResNet-18's EK-FAC/K-FAC/LiSSA sweep beside the preconditioned
solvers' sweeps, which one Hydra sweep cannot hold (CG's ``max_iter`` is a key of its own):

    python experiments/ihvp_figure.py SWEEP... --out DIR

``SWEEP``: directories holding a sweep's ``report.csv`` (``experiments/results/<name>`` or ``multirun/<name>``).
A solver at a damping that an earlier sweep already has (EK-FAC repeated as a check) is taken from the earliest
one. Draws ``DIR/ihvp_error.png`` with the ``influencelab-report`` figure of the ihvp stage
(:func:`influencelab.stages.ihvp.report_figure`); hollow points: the reference did not converge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from influencelab.metric_names import parse_metric_name
from influencelab.stages.ihvp import report_figure


def combined_rows(sweeps: list[Path]) -> list[dict]:
    """The sweeps' job rows, the first sweep's where two have the same solver and damping; only the columns the
    figure reads (a damping list's ``@<damping>`` ones too), so that the sweeps' other keys do not become series."""
    keep = ("solver", "solver.damping", "ihvp/solver", "ihvp/damping", "ihvp/rel_error", "ihvp/time_s",
            "ihvp/ref_converged")
    parts = [pd.read_csv(d / "report.csv") for d in sweeps]
    rows = pd.concat([f[[c for c in f.columns if parse_metric_name(c)[0] in keep]] for f in parts], ignore_index=True)
    number = pd.to_numeric(rows["solver.damping"], errors="coerce")  # 10 and 10.0 alike; "auto", lists as text
    key = number.astype(object).where(number.notna(), rows["solver.damping"].astype(str))
    return rows[~pd.DataFrame({"solver": rows["solver"], "damping": key}).duplicated()].to_dict("records")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = combined_rows(args.sweeps)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in report_figure(args.out, rows, args.out):
        print(f"wrote {path} ({len(rows)} points)")


if __name__ == "__main__":
    main()

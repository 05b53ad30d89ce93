"""Paired LDS differences between jobs of two sweeps scored on the same ground truth (same model, queries and
retrained subsets), e.g. EK-FAC in ``run lds`` against PCG in ``run lds_pcg``, whose solver settings a single
Hydra sweep cannot hold beside EK-FAC's:

    python experiments/lds_pair.py A_lds.csv B_lds.csv [--out FILE]

``A_lds.csv`` / ``B_lds.csv`` are two jobs' per-query LDS files (``lds.csv``, committed as
``experiments/results/<sweep>/job<N>_lds.csv``). For each measurement and each damping label both have (``0.001``
with ``0.001``, ``auto`` with ``auto``), A minus B over the queries both scored, with a 95% percentile bootstrap
interval resampling queries (:func:`influencelab.evaluation.paired_difference`, as ``lds_paired.csv`` of a sweep).
Prints the rows and writes them to ``--out`` (CSV).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from influencelab.evaluation import paired_difference


def pair(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (meas, damp), fa in a.groupby(["measurement", "damping"], sort=False):
        fb = b[(b["measurement"] == meas) & (b["damping"] == damp)]
        if fb.empty:
            continue
        both = fa.merge(fb, on="query", suffixes=("_a", "_b"))
        rows.append({"measurement": meas, "damping": damp,
                     **paired_difference(both["lds_a"].to_numpy(), both["lds_b"].to_numpy())})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    read = {"damping": str}
    out = pair(pd.read_csv(args.a, dtype=read), pd.read_csv(args.b, dtype=read))
    out.insert(0, "a", str(args.a))
    out.insert(1, "b", str(args.b))
    print(out.to_string(index=False))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()

"""#33 item 3: every detector of the ``detectors_*`` sweeps against the loss, one row per (sweep, draw, solver,
detector), from their committed ``experiments/results/<sweep>/report.csv``:

    python experiments/detectors_summary.py --out experiments/results/detectors_summary.csv

Columns: the sweep, the data and regime, whether the draw was used for choosing, the seed, the solver, the detector
(the mislabel stage's ranking name; ``self_influence``, ``relatif``, ``heldout_harm`` and their ``loss_and_`` rank
averages are the solver's), recall at 10% and 20% (with Wilson intervals at 10%), and recall at 10% minus the loss's,
paired over the flipped points (bootstrap interval, McNemar p).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: sweep -> (data and regime, used for choosing)
SWEEPS = {
    "detectors_fmnist_choose": ("FashionMNIST 5k, standard", True),
    "detectors_fmnist_choose_ekfac": ("FashionMNIST 5k, standard", True),
    "detectors_fmnist_choose_heldout": ("FashionMNIST 5k, standard", True),
    "detectors_fmnist_fresh": ("FashionMNIST 5k, standard", False),
    "detectors_fmnist_fresh_ekfac": ("FashionMNIST 5k, standard", False),
    "detectors_mnist5k_fresh": ("MNIST-5k, standard", False),
    "detectors_mnist5k_fresh_ekfac": ("MNIST-5k, standard", False),
    "detectors_memorize_fresh": ("FashionMNIST 5k, memorised", False),
    "detectors_memorize_fresh_ekfac": ("FashionMNIST 5k, memorised", False),
}
COLUMNS = ["sweep", "data", "choosing", "seed", "solver", "detector", "recall@10", "recall@10_ci_low",
           "recall@10_ci_high", "recall@20", "minus_loss_top10", "minus_loss_top10_ci_low", "minus_loss_top10_ci_high",
           "minus_loss_top10_p"]


def rows_of(sweep: str, data: str, choosing: bool, report: Path) -> list[dict]:
    out = []
    with open(report) as f:
        for job in csv.DictReader(f):
            names = sorted({k.split("/")[1] for k in job if k.startswith("mislabel/") and k.endswith("/recall@10")
                            and "@" not in k.split("/")[1] and job[k] not in ("", "nan")})
            for name in names:
                m = f"mislabel/{name}/"
                row = {"sweep": sweep, "data": data, "choosing": choosing, "seed": job.get("seed", "0"),
                       "solver": job.get("solver", ""), "detector": name}
                for c in COLUMNS[6:]:
                    v = job.get(m + c, "")
                    row[c] = "" if v in ("", "nan") else (float(f"{float(v):.3g}") if c.endswith("_p")
                                                          else round(float(v), 5))
                if name == "loss":
                    row.update({c: 0.0 for c in COLUMNS[10:13]} | {"minus_loss_top10_p": 1.0})
                out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    rows = []
    for sweep, (data, choosing) in SWEEPS.items():
        report = RESULTS / sweep / "report.csv"
        if report.exists():
            rows += rows_of(sweep, data, choosing, report)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} rows -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

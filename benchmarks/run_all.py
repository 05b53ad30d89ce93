"""``make bench``: every benchmark in one go, each printing its own markdown table with ratios vs the peers.

    python benchmarks/run_all.py            # full sizes (tens of minutes on 2 CPU cores)
    python benchmarks/run_all.py --quick    # reduced sizes, a few minutes (CSVs in benchmarks/results/quick/)

Every benchmark writes its CSV under benchmarks/results/ (ekfac, lissa, pipeline, scaling, cg_products, resnet18_ekfac .csv;
resnet18_ekfac keeps its ``before`` row and refreshes ``after``); the reduced sizes go to
benchmarks/results/quick/, which is tracked like the full-size results, never over them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes for a fast look")
    args = ap.parse_args()
    quick = args.quick
    jobs = [
        ("EK-FAC vs kronfluence", ["bench_ekfac.py", *(["--n", "5000", "--denormals", "flush"] if quick else
                                                      ["--n", "20000,60000", "--strategies", "ekfac",
                                                       "--denormals", "flush,keep", "--compression"])]),
        ("LiSSA vs dattri", ["bench_lissa.py", *(["--n", "1000", "--depth", "50"] if quick else [])]),
        ("damping sweep and memory", ["bench_pipeline.py", *(["--n", "2000"] if quick else [])]),
        ("scaling in n_train", ["bench_scaling.py", *(["--sizes", "1000,2000,4000"] if quick else [])]),
        ("CG's GGN products: jvp/vjp vs cached Jacobians", ["bench_cg_products.py", *(["--n", "100"] if quick else [])]),
        ("EK-FAC on ResNet-18 (CLI)", ["bench_resnet.py", *(["--n", "500", "--epochs", "1"] if quick else [])]),
    ]
    # reduced sizes write their CSVs beside, never over, the full-size results (benchmarks/results/*.csv), into
    # benchmarks/results/quick/ (committed with them: not git-ignored)
    env = {**os.environ, **({"INFLUENCELAB_BENCH_RESULTS": str(HERE / "results" / "quick")} if quick else {})}
    failed = []
    for title, cmd in jobs:
        print(f"\n## {title}\n", flush=True)
        r = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]], env=env)
        if r.returncode != 0:
            failed.append(title)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

"""Pipeline-level benchmarks: the cost of an EK-FAC damping sweep vs one value, and peak memory of pairwise
scoring as n_train grows. Prints markdown tables with ratios (targets: sweep of 5 <= 1.5x one value;
pairwise peak memory grows with the score matrix, not with n_train x params). Writes every measurement to
benchmarks/results/pipeline.csv (or ``$INFLUENCELAB_BENCH_RESULTS``); ``--note`` goes into its note column.

    python benchmarks/bench_pipeline.py [--n 5000] [--dataset fashion_mnist] [--note "..."]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
DAMPINGS = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
CSV_COLUMNS = ["date", "torch", "threads", "note", "dataset", "solver", "measurement", "run", "n_train", "epochs", "dampings",
               "wall_s", "ratio_vs_one", "peak_rss_mb", "score_matrix_mb", "n_train_x_params_mb"]


def run_cli(args: list[str], cwd: Path) -> tuple[float, int]:
    """Run ``python -m influencelab ARGS``; returns (wall seconds, peak RSS of the child in MB)."""
    t0 = time.perf_counter()
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags (e.g. -m) go before the overrides
    args = [a for a in args if not a.startswith("-")]
    r = subprocess.run([sys.executable, "-m", "influencelab", *flags, "logger=none", *args], cwd=cwd,
                       capture_output=True, text=True, env={**os.environ, "INFLUENCELAB_CACHE": str(cwd / "cache")})
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--note", default="", help="free text for the CSV's note column")
    args = ap.parse_args()
    base = [f"dataset={args.dataset}", f"dataset.subset={args.n}", f"trainer.epochs={args.epochs}", "solver=ekfac"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        run_cli([*base, "stages=[train]"], d)  # train once, cached for all runs below
        one, _ = run_cli([*base, "stages=[fit,self,pairwise]", f"solver.damping={DAMPINGS[2]}"], d)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        run_cli([*base, "stages=[train]"], d)
        lst, _ = run_cli([*base, "stages=[fit,self,pairwise]", f"solver.damping=[{','.join(map(str, DAMPINGS))}]"], d)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        run_cli([*base, "stages=[train]"], d)
        t0 = time.perf_counter()
        run_cli(["-m", *base, "stages=[fit,self,pairwise]", f"solver.damping={','.join(map(str, DAMPINGS))}"], d)
        multi = time.perf_counter() - t0
    rows.append(("one damping (fit + self + pairwise)", one, 1.0))
    rows.append(("5 dampings as a list, one run", lst, lst / one))
    rows.append(("5 dampings as a multirun (cached factors)", multi, multi / one))
    print(f"\n### EK-FAC damping sweep ({args.dataset}, n={args.n}, CNN; target ratio <= 1.5)\n")
    print("| run | wall s (incl. process start) | ratio vs one |\n|---|---|---|")
    for name, t, r in rows:
        print(f"| {name} | {t:.1f} | {r:.2f} |")
    base = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "note": args.note,
            "dataset": args.dataset, "solver": "ekfac"}
    csv_rows = [{**base, "measurement": "damping_sweep", "run": name, "n_train": args.n, "epochs": args.epochs,
                 "dampings": k, "wall_s": t, "ratio_vs_one": r}
                for (name, t, r), k in zip(rows, (1, len(DAMPINGS), len(DAMPINGS)), strict=True)]

    print(f"\n### Peak memory of pairwise scoring vs n_train ({args.dataset}, CNN, 100 queries)\n")
    print("| n_train | peak RSS MB | score matrix MB | n_train x params MB |\n|---|---|---|---|")
    for n in (args.n // 4, args.n // 2, args.n):
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            run_cli([f"dataset={args.dataset}", f"dataset.subset={n}", "trainer.epochs=1", "stages=[train]"], d)
            code = ("import resource,sys;from influencelab.cli import main;sys.argv=['x','logger=none',"
                    f"'dataset={args.dataset}','dataset.subset={n}','trainer.epochs=1','query.n=100',"
                    "'stages=[fit,pairwise]'];\ntry:\n main()\nfinally:\n print('PEAK',"
                    "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss//1024)")
            r = subprocess.run([sys.executable, "-c", code], cwd=d, capture_output=True, text=True,
                               env={**os.environ, "INFLUENCELAB_CACHE": str(d / "cache")})
            peak = int(r.stdout.split("PEAK")[-1].strip()) if "PEAK" in r.stdout else -1
            from influencelab.models import cnn

            params = sum(p.numel() for p in cnn(10, 1, 28).parameters())
            print(f"| {n} | {peak} | {100 * n * 4 / 2**20:.1f} | {n * params * 4 / 2**20:.0f} |")
            csv_rows.append({**base, "measurement": "pairwise_peak_memory", "run": "fit + pairwise, 100 queries",
                             "n_train": n, "epochs": 1, "dampings": 1, "peak_rss_mb": peak,
                             "score_matrix_mb": 100 * n * 4 / 2**20, "n_train_x_params_mb": n * params * 4 / 2**20})
    out = Path(os.environ.get("INFLUENCELAB_BENCH_RESULTS", Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pipeline.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, restval="")
        w.writeheader()
        w.writerows(csv_rows)
    print(f"\nwrote {out / 'pipeline.csv'}")


if __name__ == "__main__":
    main()

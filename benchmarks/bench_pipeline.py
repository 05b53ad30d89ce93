"""Pipeline-level benchmarks: the cost of an EK-FAC damping sweep vs one value, and peak memory of pairwise
scoring as n_train grows. Prints markdown tables with ratios (targets: sweep of 5 <= 1.5x one value;
pairwise peak memory grows with the score matrix, not with n_train x params).

    python benchmarks/bench_pipeline.py [--n 5000] [--dataset fashion_mnist]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
DAMPINGS = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


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


if __name__ == "__main__":
    main()

"""How each stage's cost grows with n_train (FashionMNIST, CNN, EK-FAC): it should be linear.

    python benchmarks/bench_scaling.py [--sizes 2500,5000,10000,20000,60000]

Each size is one CLI run (``stages=[train,fit,self,pairwise]``, the CNN trained 1 epoch, 100 queries, a fresh
cache). Prints a markdown table of seconds per stage and the per-point cost relative to the smallest size
(target: linear growth, i.e. per-point ratios within 10% of 1 for pairwise), and writes
benchmarks/results/scaling.csv (with the date, PyTorch version and thread count).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
STAGES = ("fit", "self", "pairwise")


def run(n: int, dataset: str, cache: Path, cwd: Path) -> dict:
    args = ["logger=none", f"dataset={dataset}", f"dataset.subset={n}", "trainer.epochs=1", "query.n=100",
            "stages=[train,fit,self,pairwise]", "hydra.run.dir=run"]
    r = subprocess.run([sys.executable, "-m", "influencelab", *args], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "INFLUENCELAB_CACHE": str(cache)})
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return json.loads((cwd / "run" / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--sizes", default="2500,5000,10000,20000,60000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    import torch

    torch_version, threads = torch.__version__, torch.get_num_threads()  # the CLI's own (same environment)
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            m = run(n, args.dataset, Path(tmp) / "cache", Path(tmp))
        rows.append({"date": datetime.date.today().isoformat(), "torch": torch_version, "threads": threads,
                     "n_train": n, **{f"{s}_s": m.get(f"time/{s}_s", float("nan")) for s in STAGES},
                     "peak_rss_mb": m.get("mem/peak_rss_mb")})
        print(f"n={n}: " + ", ".join(f"{s} {rows[-1][f'{s}_s']:.1f}s" for s in STAGES), flush=True)
    base = rows[0]
    print(f"\n### Scaling with n_train ({args.dataset}, CNN, EK-FAC, 100 queries)\n")
    print("| n_train | " + " | ".join(f"{s} s (per-point vs n={base['n_train']})" for s in STAGES) + " | peak RSS MB |")
    print("|---|" + "---|" * (len(STAGES) + 1))
    for r in rows:
        cells = []
        for s in STAGES:
            per = (r[f"{s}_s"] / r["n_train"]) / (base[f"{s}_s"] / base["n_train"])
            cells.append(f"{r[f'{s}_s']:.1f} ({per:.2f})")
        print(f"| {r['n_train']} | " + " | ".join(cells) + f" | {r['peak_rss_mb']:.0f} |")
    out = Path(os.environ.get("INFLUENCELAB_BENCH_RESULTS", Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scaling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()

"""EK-FAC on a timm ResNet-18 as a new user runs it (issue #18): the CLI command

    influencelab dataset=fashion_mnist dataset.subset=N model=resnet18 trainer.epochs=E solver=ekfac \\
        solver.damping=auto stages=[train,fit,self]

in a fresh process with a fresh cache, timed from its own metrics (``time/train_s``, ``time/fit_s``,
``time/self_s``) and peak RSS; the fit's phases (covariances, eigendecomposition, correction) from its log.
Target: fit + self <= 10 training epochs and peak RSS <= 4 GB. ``--baseline`` takes a self-influence score file
(``scores/self.safetensors`` of an earlier run of the same command) and adds the Spearman correlation and the
largest relative difference against it (``--keep DIR`` keeps this run's directory, scores included).

    python benchmarks/bench_resnet.py [--n 2000] [--epochs 3] [--baseline self.safetensors] [--label after]

The 1-minute load average before and after goes with the row (the run alone is about 2 on 2 cores; more means
other jobs shared the cores, and on a 2-core machine that can slow every phase several-fold).

Writes benchmarks/results/resnet18_ekfac.csv (or ``$INFLUENCELAB_BENCH_RESULTS``), one row per ``--label``:
a run replaces its label's row and keeps the others (``before``: the code of 2c92a3e, measured by running this
script with that commit's ``src`` first on ``PYTHONPATH``; ``after``: the code as it is, which ``make bench``
refreshes).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
CSV_NAME = "resnet18_ekfac.csv"
CSV_COLUMNS = ["run", "source", "date", "torch", "threads", "load_avg_start", "load_avg_end", "n_train", "epochs",
               "train_s_per_epoch", "fit_s", "self_s", "fit_plus_self_epochs", "covariances_s", "eigh_s",
               "correction_s", "peak_rss_mb", "spearman_vs_baseline", "max_rel_diff_vs_baseline", "note"]
PHASES = re.compile(r"ekfac fit: covariances ([\d.]+)s, eigendecomposition ([\d.]+)s, correction ([\d.]+)s")
# the code of 2c92a3e logs no phases; its progress line gives the correction pass alone
OLD_CORRECTION = re.compile(r"ekfac eigenvalue correction: .*elapsed (\d+):(\d+), done")


def git_source() -> str:
    """``HEAD``'s short hash, ``+dirty`` with uncommitted changes under src/ (what this run's code is)."""
    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        return r.stdout.strip() if r.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "src") else "")


def compare(baseline: Path, scores: Path) -> tuple[float, float]:
    """Spearman correlation and largest relative difference of two self-influence score files."""
    from safetensors.torch import load_file
    from scipy.stats import spearmanr

    a, b = (load_file(p)["scores"].double().flatten() for p in (baseline, scores))
    if a.shape != b.shape:
        raise SystemExit(f"--baseline {baseline} has {len(a)} scores, this run {len(b)}: use the same --n")
    rel = float(((a - b).abs() / a.abs().clamp_min(1e-30)).max())
    return float(spearmanr(a.numpy(), b.numpy()).statistic), rel


def phases(log_text: str) -> dict[str, float]:
    """The fit's phases from its log (only the correction pass for code that predates the phase line)."""
    m = PHASES.search(log_text)
    if m:
        return dict(zip(["covariances_s", "eigh_s", "correction_s"], map(float, m.groups()), strict=True))
    m = OLD_CORRECTION.search(log_text)
    return {"correction_s": 60.0 * int(m.group(1)) + int(m.group(2))} if m else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="dataset.subset (training points)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--baseline", type=Path, default=None, help="self-influence score file to compare against")
    ap.add_argument("--label", default="after", help="the CSV row this run replaces")
    ap.add_argument("--source", default=None, help="what code ran (default: git HEAD, +dirty if src/ changed)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run directory (scores, log) here")
    ap.add_argument("--note", default="", help="free text for the CSV's note column")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "influencelab", "dataset=fashion_mnist", f"dataset.subset={args.n}",
               "model=resnet18", f"trainer.epochs={args.epochs}", "solver=ekfac", "solver.damping=auto",
               "stages=[train,fit,self]", "logger=none", f"hydra.run.dir={run_dir}", f"paths.cache={tmp}/cache"]
        print(" ".join(cmd[3:]), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-4000:])
        peak_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the CLI's (the only child)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        log_text = (run_dir / "influencelab.log").read_text()
        scores = run_dir / "scores" / "self.safetensors"
        rho, rel = compare(args.baseline, scores) if args.baseline is not None else (None, None)
        if args.keep is not None:
            shutil.copytree(run_dir, args.keep, dirs_exist_ok=True)
    epoch = metrics["time/train_s"] / args.epochs
    fit, self_s = metrics["time/fit_s"], metrics["time/self_s"]
    row = {"run": args.label, "source": args.source or git_source(), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "load_avg_start": round(load, 2),
           "load_avg_end": round(os.getloadavg()[0], 2),
           "n_train": args.n, "epochs": args.epochs, "train_s_per_epoch": round(epoch, 2), "fit_s": round(fit, 2),
           "self_s": round(self_s, 2), "fit_plus_self_epochs": round((fit + self_s) / epoch, 2),
           **{k: round(v, 2) for k, v in phases(log_text).items()}, "peak_rss_mb": round(peak_child),
           "spearman_vs_baseline": "" if rho is None else round(rho, 6),
           "max_rel_diff_vs_baseline": "" if rel is None else f"{rel:.2e}", "note": args.note}

    print(f"\n### EK-FAC fit + self on ResNet-18 (fashion_mnist, n={args.n}; targets <= 10 epochs, <= 4096 MB)\n")
    print("| run | train s/epoch | fit s | self s | fit + self (epochs) | covariances s | eigh s | correction s "
          "| peak RSS MB | Spearman vs baseline |\n|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['run']} ({row['source']}) | {epoch:.1f} | {fit:.1f} | {self_s:.1f} | "
          f"{row['fit_plus_self_epochs']:.1f} | {row.get('covariances_s', '')} | {row.get('eigh_s', '')} | "
          f"{row.get('correction_s', '')} | {row['peak_rss_mb']} | {row['spearman_vs_baseline']} |")

    out = Path(os.environ.get("INFLUENCELAB_BENCH_RESULTS", Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / CSV_NAME
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["run"] != args.label]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows([*rows, row])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

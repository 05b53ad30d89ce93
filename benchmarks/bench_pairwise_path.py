"""Pairwise scoring on the path users run (issue 31 item 5): the CLI's pairwise stage, the API's first pairwise
call and kronfluence's ``compute_pairwise_scores``, on the same trained model, training data and queries, back to
back, at each n.

    python benchmarks/bench_pairwise_path.py [--n 20000,60000] [--repeats 3] [--logger wandb]

Per n: the CLI runs ``python -m influencelab dataset=fashion_mnist dataset.subset=N dataset.label_noise=0.1
model=cnn trainer.epochs=2 solver=ekfac solver.curvature=empirical_fisher solver.damping=1e-3 query.n=100
'stages=[train,fit,pairwise]'`` as a new user would (its default logger: W&B offline, into a temporary WANDB_DIR;
a fresh cache), once to train and fit, then ``--repeats`` more times with the model and factors cached and the
pairwise scores not (each a fresh process: the figure is the stage's own ``time/pairwise_s``, which includes the
first call's factor load, the test split's subset, the queries' gradients and preconditioning, and the stage's wall
time in the log line beside it, which adds writing the score file and its W&B artifact). Then, in this process, on
the model the CLI trained (``load_run``), its training data and its 100 query points: the API (``Attributor``, the
same solver settings, fitted once) scores them ``--repeats`` times from a new ``Attributor`` each time (each a
first call: query gradients, preconditioning, scoring), and kronfluence (``Analyzer``, its fp32 defaults, the
empirical Fisher, batch 256, all queries in one batch: its fastest documented CPU setting) fits and scores them
``--repeats`` times. PyTorch's defaults on both sides (subnormal floats kept: what users get). ``--denormals flush``
instead sets PyTorch's flush-denormal mode in this process before any thread starts (kronfluence's per-example
rotations of a well-fitted model's tiny gradients run ~100x slower on subnormal floats, see bench_ekfac.py; no
kronfluence document asks for it, but it is its fastest setting here): the API and kronfluence rows then use it, and
the CLI, which has no such setting, is not run. The medians are the figures; every run is in the CSV.

Writes benchmarks/results/pairwise_path.csv (one row per n and path: median and every run, the ratio to
kronfluence's median, the Spearman correlation of the path's scores with kronfluence's) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from peers import dist_version, kronfluence_analyzer  # noqa: E402

from influencelab import Attributor, load_run  # noqa: E402
from influencelab.files import read_tensors  # noqa: E402

DAMPING = 1e-3
BATCH = 256
N_QUERIES = 100
COLUMNS = ["date", "torch", "kronfluence", "threads", "logger", "denormals", "n", "path", "pairwise_s", "runs_s", "ratio_vs_kronfluence",
           "spearman_vs_kronfluence", "stage_wall_s", "note"]


def cli_args(n: int, logger: str) -> list[str]:
    return ["dataset=fashion_mnist", f"dataset.subset={n}", "dataset.label_noise=0.1", "model=cnn", "trainer.epochs=2",
            "solver=ekfac", "solver.curvature=empirical_fisher", f"solver.damping={DAMPING}", f"query.n={N_QUERIES}",
            "stages=[train,fit,pairwise]", *([] if logger == "wandb" else [f"logger={logger}"])]


def run_cli(n: int, logger: str, run_dir: Path, env: dict) -> tuple[float, float]:
    """One CLI run into ``run_dir``: (its ``time/pairwise_s``, the pairwise stage's wall time from its log)."""
    r = subprocess.run([sys.executable, "-m", "influencelab", *cli_args(n, logger), f"hydra.run.dir={run_dir}"],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"the CLI failed:\n{r.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stage = re.search(r"stage pairwise done in ([0-9.]+)s", r.stdout + r.stderr)
    return metrics["time/pairwise_s"], float(stage.group(1)) if stage else float("nan")


def one_n(n: int, repeats: int, logger: str, common: dict, cli_paths: bool = True) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "INFLUENCELAB_CACHE": str(tmp / "cache"), "WANDB_DIR": str(tmp), "WANDB_MODE":
               os.environ.get("WANDB_MODE", "offline")}
        run_cli(n, logger, tmp / "run0", env)  # trains, fits and scores (cached from here on)
        cli, walls = [], []
        for i in range(repeats if cli_paths else 0):
            shutil.rmtree(tmp / "cache" / "pairwise", ignore_errors=True)  # the scores, not the model or factors
            t, wall = run_cli(n, logger, tmp / f"run{i + 1}", env)
            cli.append(t)
            walls.append(wall)
            print(f"  n={n} cli run {i + 1}: time/pairwise_s {t:.2f} s (stage {wall:.1f} s)", flush=True)
        last = f"run{len(cli)}"
        run = load_run(tmp / last)
        cli_scores = read_tensors(tmp / last / "scores" / "pairwise.safetensors")[0]
        q_idx = cli_scores["query_indices"].long()
        train, queries = run.train, run.test.subset(q_idx)
        assert len(train) == n and len(queries) == N_QUERIES

        api, api_scores = [], None
        attr = Attributor(run.model, solver="ekfac", damping=DAMPING, curvature="empirical_fisher", batch_size=BATCH,
                          score_batch_size=BATCH).fit(train)  # no cache_dir: nothing of one call is kept for the next
        for i in range(repeats):
            t0 = time.perf_counter()
            api_scores = attr.pairwise(queries)[0]
            api.append(time.perf_counter() - t0)
            print(f"  n={n} api run {i + 1}: {api[-1]:.2f} s", flush=True)

        kron = []
        with tempfile.TemporaryDirectory() as ktmp:
            an, fargs, sargs = kronfluence_analyzer(run.model, ktmp, "ekfac", DAMPING, True, "cpu", "fp32")
            tr = TensorDataset(train.x, train.targets)
            qs = TensorDataset(queries.x, queries.targets)
            an.fit_all_factors("f", tr, per_device_batch_size=BATCH, factor_args=fargs)
            for i in range(repeats):
                t0 = time.perf_counter()
                an.compute_pairwise_scores(f"p{i}", "f", qs, tr, per_device_query_batch_size=N_QUERIES,
                                           per_device_train_batch_size=BATCH, score_args=sargs)
                kron.append(time.perf_counter() - t0)
                print(f"  n={n} kronfluence run {i + 1}: {kron[-1]:.2f} s", flush=True)
            kron_scores = an.load_pairwise_scores("p0")["all_modules"].float()

    def rho(a: torch.Tensor) -> float:
        return float(spearmanr(a.flatten().numpy(), kron_scores.flatten().numpy()).statistic)

    k_med = statistics.median(kron)
    paths = (
            ("cli", cli, cli_scores["scores"], {"stage_wall_s": statistics.median(walls) if walls else float("nan"),
                                                "note": "time/pairwise_s of a fresh CLI process (model, factors "
                                                        "cached); stage_wall_s adds the score file and artifact"}),
            ("api", api, api_scores, {"note": "Attributor.pairwise of a fitted Attributor (no cache_dir)"}),
            ("kronfluence", kron, kron_scores, {"note": "compute_pairwise_scores, factors fitted"}))
    for path, runs, scores, extra in paths[0 if cli_paths else 1:]:
        med = statistics.median(runs)
        rows.append({**common, "n": n, "path": path, "pairwise_s": med, "runs_s": ";".join(f"{r:.3f}" for r in runs),
                     "ratio_vs_kronfluence": med / k_med, "spearman_vs_kronfluence": rho(scores), **extra})
    return rows


def table(df: pd.DataFrame) -> str:
    lines = ["| n | subnormals | path | pairwise s (median) | runs | ratio to kronfluence (target ≤ 0.5) | "
             "Spearman vs kronfluence |", "|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        lines.append(f"| {r.n} | {r.denormals} | {r.path} | {r.pairwise_s:.2f} | {r.runs_s.replace(';', ', ')} | "
                     f"{r.ratio_vs_kronfluence:.2f} | {r.spearman_vs_kronfluence:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="20000,60000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--logger", default="wandb", help="the CLI's logger (wandb: its default, offline)")
    ap.add_argument("--denormals", choices=["keep", "flush"], default="keep")
    ap.add_argument("--out", default=str(HERE / "results" / "pairwise_path.csv"), help="appended to (header once)")
    args = ap.parse_args()
    if args.denormals == "flush":  # first, before any thread pool exists (a pool started earlier keeps its own)
        assert torch.set_flush_denormal(True), "this CPU cannot flush denormals"
    common = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "kronfluence": dist_version("kronfluence"), "threads": torch.get_num_threads(), "logger": args.logger,
              "denormals": args.denormals}
    rows = []
    for n in map(int, args.n.split(",")):
        rows += one_n(n, args.repeats, args.logger, common, cli_paths=args.denormals == "keep")
    df = pd.DataFrame(rows, columns=COLUMNS)
    out = Path(args.out)
    df.to_csv(out, mode="a", header=not out.exists(), index=False)
    print(table(pd.read_csv(out)))


if __name__ == "__main__":
    main()

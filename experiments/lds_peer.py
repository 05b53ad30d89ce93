"""LDS of kronfluence's scores on the ground truth of an influencelab ``lds`` run: both libraries are scored
against exactly the same retrained subsets, with the same trained model, queries and damping.

    python experiments/lds_peer.py multirun/lds/0 [--damping 1e-3] [--strategies ekfac,identity]

Prints a markdown table (influencelab's own LDS from the run's metrics.json beside kronfluence's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from influencelab import load_run
from influencelab.stages.lds import lds_per_query, summarize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_ekfac import kronfluence  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--strategies", default="ekfac,identity")
    args = ap.parse_args()
    run = load_run(args.run_dir)
    truth = load_file(str(args.run_dir / "scores" / "lds_truth.safetensors"))
    where = {int(i): p for p, i in enumerate(run.test.indices.tolist())}
    queries = run.test.subset(torch.tensor([where[int(i)] for i in truth["query_indices"]]))
    masks = truth["masks"].double()
    seed = int(run.config.seed)
    print("| method | LDS (loss) mean ± std | 95% CI | LDS (margin) |\n|---|---|---|---|")
    print(f"| influencelab {run.config.solver._target_.rsplit('.', 1)[1]} (this run) | "
          f"{run.metrics['lds/mean']:.3f} ± {run.metrics['lds/std']:.3f} | [{run.metrics['lds/ci_low']:.3f}, "
          f"{run.metrics['lds/ci_high']:.3f}] | {run.metrics['lds_margin/mean']:.3f} |")
    for strategy in args.strategies.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            _, _, scores = kronfluence(run.model, run.train, queries, 256, tmp, strategy, empirical=False,
                                       damping=args.damping)
        pred = scores.detach().double() @ masks.T
        out = {m: summarize(lds_per_query(pred, sign * truth[m].T), 1000, seed)
               for m, sign in (("loss", -1.0), ("margin", 1.0))}
        print(f"| kronfluence 1.0.1 {strategy} | {out['loss']['mean']:.3f} ± {out['loss']['std']:.3f} | "
              f"[{out['loss']['ci_low']:.3f}, {out['loss']['ci_high']:.3f}] | {out['margin']['mean']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()

"""LDS of kronfluence's scores on the ground truth of an influencelab ``lds`` run: both libraries are scored
against exactly the same retrained subsets, with the same trained model, queries and damping.

    python experiments/lds_peer.py multirun/lds/0 [--damping 1e-3] [--strategies ekfac,identity] [--out FILE]

Prints a markdown table (influencelab's own LDS from the run's metrics.json beside kronfluence's) and writes the
same rows to ``--out`` (default ``experiments/results/lds_peer/lds_peer.json``: a list of objects with the keys of
a report.csv row, ``method``, ``strategy``, ``lds/mean``, ``lds/std``, ``lds/ci_low``, ``lds/ci_high``,
``lds_margin/...``), which RESULTS.md's tables can read (experiments/tables.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib.metadata import version
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
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "lds_peer" / "lds_peer.json")
    args = ap.parse_args()
    run = load_run(args.run_dir)
    truth = load_file(str(args.run_dir / "scores" / "lds_truth.safetensors"))
    where = {int(i): p for p, i in enumerate(run.test.indices.tolist())}
    queries = run.test.subset(torch.tensor([where[int(i)] for i in truth["query_indices"]]))
    masks = truth["masks"].double()
    seed = int(run.config.seed)
    common = {"run_dir": str(args.run_dir), "damping": args.damping, "seed": seed, "torch": torch.__version__}
    ours = run.config.solver._target_.rsplit(".", 1)[1]
    rows = [{"method": f"influencelab {ours} (this run)", "library": "influencelab", "strategy": ours, **common,
             **{k: run.metrics[k] for k in sorted(run.metrics) if k.startswith(("lds/", "lds_margin/"))}}]
    print("| method | LDS (loss) mean ± std | 95% CI | LDS (margin) |\n|---|---|---|---|")
    for strategy in args.strategies.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            _, _, scores = kronfluence(run.model, run.train, queries, 256, tmp, strategy, empirical=False,
                                       damping=args.damping)
        pred = scores.detach().double() @ masks.T
        out = {m: summarize(lds_per_query(pred, sign * truth[m].T), 1000, seed)
               for m, sign in (("loss", -1.0), ("margin", 1.0))}
        rows.append({"method": f"kronfluence {version('kronfluence')} {strategy}", "library": "kronfluence",
                     "strategy": strategy, **common,
                     **{f"{'lds' if m == 'loss' else 'lds_margin'}/{k}": v for m, o in out.items() for k, v in o.items()}})
    for r in rows:
        print(f"| {r['method']} | {r['lds/mean']:.3f} ± {r['lds/std']:.3f} | [{r['lds/ci_low']:.3f}, "
              f"{r['lds/ci_high']:.3f}] | {r['lds_margin/mean']:.3f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main()

"""LDS of kronfluence's scores on the ground truth of an influencelab ``lds`` run: both libraries are scored
against exactly the same retrained subsets, with the same trained model, queries and damping.

    python experiments/lds_peer.py multirun/lds/0 [--damping 1e-3] [--strategies ekfac,identity] [--out FILE]

Prints a markdown table (influencelab's own LDS from the run's metrics.json beside kronfluence's) and writes the
same rows to ``--out`` (default ``experiments/results/lds_peer/lds_peer.json``: a list of objects with the keys of
a report.csv row, ``method``, ``strategy``, ``lds/mean``, ``lds/std``, ``lds/ci_low``, ``lds/ci_high``,
``lds_margin/...``), which RESULTS.md's tables can read (experiments/tables.py). Each kronfluence row also has its
difference from the run's own LDS at that damping, paired by query with a bootstrap interval over queries
(``paired/lds/diff``, ``paired/lds/ci_low``, ``paired/lds/ci_high``, the same for ``lds_margin``; influencelab
minus kronfluence), from the run's ``lds.csv``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from influencelab import load_run
from influencelab.evaluation import paired_difference
from influencelab.stages.lds import lds_per_query, summarize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peers import kronfluence_run  # noqa: E402


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
    # the run's per-query LDS at this damping, in the truth's query order (what kronfluence's is paired with)
    per = pd.read_csv(args.run_dir / "lds.csv")
    per = per[per["damping"].astype(str).map(lambda d: d != "auto" and float(d) == args.damping)]
    qids = [int(i) for i in truth["query_indices"]]
    own = {m: per[per["measurement"] == m].set_index("query")["lds"].reindex(qids).to_numpy() for m in ("loss", "margin")}
    print("| method | LDS (loss) mean ± std | 95% CI | LDS (margin) |\n|---|---|---|---|")
    for strategy in args.strategies.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            # kronfluence's defaults at this damping, with the true Fisher (sampled labels), as the run's solver
            _, _, scores = kronfluence_run(run.model, TensorDataset(run.train.x, run.train.targets),
                                           TensorDataset(queries.x, queries.targets), tmp, strategy,
                                           args.damping, empirical=False, self_scores=False)
        pred = scores.detach().double() @ masks.T
        theirs = {m: lds_per_query(pred, sign * truth[m].T, dropna=False) for m, sign in (("loss", -1.0), ("margin", 1.0))}
        out = {m: summarize(v, 1000, seed) for m, v in theirs.items()}
        paired = {m: paired_difference(own[m], theirs[m], 1000, seed) for m in theirs}
        name = {"loss": "lds", "margin": "lds_margin"}
        rows.append({"method": f"kronfluence {version('kronfluence')} {strategy}", "library": "kronfluence",
                     "strategy": strategy, **common,
                     **{f"{name[m]}/{k}": v for m, o in out.items() for k, v in o.items()},
                     **{f"paired/{name[m]}/{k}": v for m, o in paired.items() for k, v in o.items()}})
    for r in rows:
        print(f"| {r['method']} | {r['lds/mean']:.3f} ± {r['lds/std']:.3f} | [{r['lds/ci_low']:.3f}, "
              f"{r['lds/ci_high']:.3f}] | {r['lds_margin/mean']:.3f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main()

"""What float32 can reach on a CG solve, against CG's measured floor (issue 30 item 3).

    python benchmarks/cg_floor.py [--n 500] [--dampings 1e-3,1e-2,1e-1]

A digits CNN (``models.cnn``, 13,706 parameters) trained full-batch for 60 Adam steps on ``n`` points, in float32,
and 4 test-point query gradients. Per damping: float32 CG (tol 1e-6, max_iter 400) with its recorded relative
residual, floor and cut (``solver/floor``: :meth:`influencelab.solvers.cg.CG._floor`); float64 CG on the exact
float64 copy of the model (tol 1e-11) as the truth; the float32 residual of that truth rounded to float32 (what
float32 can reach) and the floor measured there; the float64 residual of the float32 answer; and the float32
answer's relative error against the truth. Writes benchmarks/results/cg_floor.csv (or into
``$INFLUENCELAB_BENCH_RESULTS``) with the date, PyTorch version and thread count.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from influencelab import Attributor
from influencelab.data.digits import Digits
from influencelab.models import cnn
from influencelab.solvers.cg import CG


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--dampings", default="1e-3,1e-2,1e-1")
    args = ap.parse_args()
    torch.manual_seed(0)
    train, test = Digits(subset=args.n, seed=0).load()
    x, y = train.x.float(), train.targets
    model = cnn(10, 1, 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    q = TensorDataset(test.x[:4].float(), test.targets[:4])
    rows = []
    for lam in [float(d) for d in args.dampings.split(",")]:
        a32 = Attributor(model, solver=CG(damping=lam, tol=1e-6, max_iter=400, batch_size=256)).fit(
            TensorDataset(x, y))
        v = a32.query_gradients(q)
        x32 = a32.precondition(v)[0]
        c = a32.diagnostics[lam]
        a64 = Attributor(copy.deepcopy(model).double(), solver=CG(damping=lam, tol=1e-11, max_iter=1500,
                                                                   batch_size=256, dtype="float64")).fit(
            TensorDataset(x.double(), y))
        x64 = a64.precondition(v.double())[0]
        s32, s64 = a32.solver, a64.solver
        rounded = x64.float()
        A_r = s32._curv.mean_product(rounded, s32._data, 256) + lam * rounded
        reach = ((v - A_r).norm(dim=1) / v.norm(dim=1)).max().item()
        floor_truth = s32._floor(rounded, v, lam, A_r).max().item()
        xd = x32.double()
        res64 = ((v.double() - (s64._curv.mean_product(xd, s64._data, 256) + lam * xd)).norm(dim=1)
                 / v.double().norm(dim=1)).max().item()
        err = ((xd - x64).norm(dim=1) / x64.norm(dim=1)).max().item()
        rows.append({"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "n": args.n, "params": s32.layout.size, "damping": lam,
                     "cg32_iterations": c.iterations, "cg32_residual": c.rel_residual_max,
                     "cg32_residual_float64": res64, "cg32_floor": c.floor, "cg32_cut": c.tol,
                     "cg32_converged": c.converged, "old_cut_100eps": 100 * torch.finfo(torch.float32).eps,
                     "rounded_truth_residual": reach, "floor_at_rounded_truth": floor_truth,
                     "cg32_error_vs_float64": err})
        print(rows[-1], flush=True)
    out = Path(os.environ.get("INFLUENCELAB_BENCH_RESULTS", Path(__file__).parent / "results")) / "cg_floor.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", out)


if __name__ == "__main__":
    main()

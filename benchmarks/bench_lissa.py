"""LiSSA: influencelab vs dattri 0.3.0 at equal depth, batch size, scale, damping and queries (Hessian products).

    python benchmarks/bench_lissa.py [--n 5000] [--queries 10] [--depth 200] [--batch 32]

FashionMNIST (Debian package; digits as fallback), a CNN trained one epoch. Prints a markdown table of the
query-IHVP wall time and the ratio ours / dattri (target <= 0.05), and the relative difference between the
two results (both are stochastic: same recursion, different batch draws).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from influencelab.data.digits import Digits
from influencelab.data.fashion_mnist import FashionMNIST
from influencelab.errors import DataNotFoundError
from influencelab.models import cnn
from influencelab.solvers.lissa import LiSSA
from influencelab.train import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--depth", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--skip-peer", action="store_true")
    args = ap.parse_args()
    try:
        train, test = FashionMNIST(subset=args.n, download=False).load()
    except DataNotFoundError:
        train, test = Digits(subset=min(args.n, 1437)).load()
    torch.manual_seed(0)
    model = cnn(10, 1, train.x.shape[-1])
    Trainer(epochs=1, batch_size=128, lr=1e-3, seed=0, device="cpu").fit(model, train)
    model.eval()
    ours = LiSSA(damping=args.damping, curvature="hessian", depth=args.depth, batch_size=args.batch)
    ours.fit(model, train)
    scale = ours._scale
    v = ours.train_grads(model, test.x[: args.queries], test.targets[: args.queries])
    t0 = time.perf_counter()
    x_ours = ours.precondition(v, args.damping)
    t_ours = time.perf_counter() - t0
    print(f"{len(train)} training points, {args.queries} queries, depth {args.depth}, batch {args.batch}, "
          f"scale {scale:.3g}, damping {args.damping}, {ours.layout.size:,} parameters", flush=True)
    rows = [("influencelab", t_ours)]
    if not args.skip_peer:
        from dattri.func.hessian import ihvp_lissa

        names = [n for n, _ in model.named_parameters()]
        shapes = [p.shape for _, p in model.named_parameters()]
        sizes = [p.numel() for _, p in model.named_parameters()]
        theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

        def loss(t: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            p = {n: s.reshape(sh) for n, s, sh in zip(names, t.split(sizes), shapes, strict=True)}
            return F.cross_entropy(functional_call(model, p, (xb,)), yb.long())

        # dattri's update h = v + (1 - d) h - H h / s equals ours with d = damping / scale
        ihvp = ihvp_lissa(loss, argnums=0, batch_size=args.batch, recursion_depth=args.depth,
                          damping=args.damping / scale, scaling=scale, mode="rev-rev")
        # dattri works in parameter order; convert our layout for the comparison
        order = ours.layout.unflatten(v, model)
        v_param = torch.cat([order[n].reshape(len(v), -1) for n in names], dim=1)
        t0 = time.perf_counter()
        # labels passed as floats: dattri's rev-rev mode differentiates through every input
        x_dattri = ihvp((theta, train.x, train.targets.float()), v_param, in_dims=(None, 0, 0))
        rows.append(("dattri 0.3.0", time.perf_counter() - t0))
        got = ours.layout.unflatten(x_ours, model)
        x_ours_param = torch.cat([got[n].reshape(len(v), -1) for n in names], dim=1)
        rel = ((x_ours_param - x_dattri).norm(dim=1) / x_dattri.norm(dim=1)).mean()
    print("\n| implementation | query IHVPs s |\n|---|---|")
    for impl, t in rows:
        print(f"| {impl} | {t:.1f} |")
    if not args.skip_peer:
        print(f"| **ratio ours / dattri** | **{rows[0][1] / rows[1][1]:.3f}** (target <= 0.05) |")
        print(f"\nmean relative difference of the IHVPs (stochastic, different batches): {float(rel):.3f}")


if __name__ == "__main__":
    main()

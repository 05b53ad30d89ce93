"""CG's exact GGN products two ways: k jvp/vjp passes per call, or the per-example output Jacobians formed once
and kept (``solver.jacobian_cache_gb``), then two matrix products per call.

    python benchmarks/bench_cg_products.py [--n 500] [--k 1,8,100] [--repeats 3]

On the section 3 CNN (FashionMNIST-shaped 28x28 inputs, 105,866 parameters, untrained: the cost does not depend on
the weights or pixel values) over ``n`` training points, batch 256: the seconds per product of k vectors by each
path (median of ``repeats``), the seconds to form the Jacobians once, their ratio, and after how many products
the cache has paid for itself. Prints a markdown table and writes benchmarks/results/cg_products.csv (with the
date, PyTorch version and thread count; or into ``$INFLUENCELAB_BENCH_RESULTS``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

from influencelab.data.base import LabeledData
from influencelab.models import cnn
from influencelab.solvers.curvature import Curvature
from influencelab.solvers.layout import ParamLayout


def seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--k", default="1,8,100")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("INFLUENCELAB_BENCH_RESULTS", Path(__file__).parent
                                                                    / "results")) / "cg_products.csv")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = cnn(num_classes=10, in_chans=1, image_size=28, channels=[16, 32], hidden=64).eval()
    x, y = torch.randn(args.n, 1, 28, 28), torch.randint(0, 10, (args.n,))
    data = LabeledData(x, y, y, torch.arange(args.n), 10)
    layout = ParamLayout(model, "all")
    jvp = Curvature(model, layout, "fisher")
    jac = Curvature(model, layout, "fisher", jacobian_cache_bytes=2**40)
    jvp.mean_product(torch.randn(1, layout.size), data, 256)  # (warm-up)
    t0 = time.perf_counter()
    jac.mean_product(torch.zeros(1, layout.size), data, 256)  # forms and keeps the Jacobians
    form_s = time.perf_counter() - t0
    rows = []
    for k in (int(v) for v in args.k.split(",")):
        V = torch.randn(k, layout.size)
        a, b = jvp.mean_product(V, data, 256), jac.mean_product(V, data, 256)
        rel = float((a - b).norm() / a.norm())
        s_jvp = seconds(lambda V=V: jvp.mean_product(V, data, 256), args.repeats)
        s_jac = seconds(lambda V=V: jac.mean_product(V, data, 256), args.repeats)
        rows.append({"n": args.n, "k": k, "parameters": layout.size, "jvp_s": s_jvp, "jacobian_form_s": form_s,
                     "jacobian_s": s_jac, "speedup": s_jvp / s_jac,
                     "break_even_products": form_s / (s_jvp - s_jac) if s_jvp > s_jac else float("inf"),
                     "rel_diff": rel, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                     "threads": torch.get_num_threads()})
    print("| n | k | jvp/vjp s per product | Jacobians: form once (s) | then s per product | speed-up | "
          "pays off after (products) | relative difference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['k']} | {r['jvp_s']:.3g} | {r['jacobian_form_s']:.3g} | {r['jacobian_s']:.3g} | "
              f"{r['speedup']:.2g}x | {r['break_even_products']:.2g} | {r['rel_diff']:.1e} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

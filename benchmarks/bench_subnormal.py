"""Why kronfluence's CPU time grows with how well the model fits: subnormal floats.

    python benchmarks/bench_subnormal.py [--sizes 5000,20000]

1. A float32 matrix product ``[2048 x 1568] @ [1568 x 1568]`` (the shape of rotating a batch of the CNN's
   ``Linear(1568, 64)`` per-sample gradients into its eigenbasis) on normal and on subnormal inputs, with
   PyTorch's default floating-point mode and with flush-denormal set at process start (each in its own process:
   a thread pool keeps the mode it started with).
2. The CNN of ``bench_ekfac.py`` trained the same way (2 epochs, seed 0) on the first n FashionMNIST points: the
   share of 2,000 training points with a subnormal entry (0 < |x| < 1.18e-38) in the per-sample gradient
   ``s aᵀ`` of one of its Linear layers (output gradient of the summed loss times input), what kronfluence
   rotates with matrix products, and the share of such entries; then the subnormal entries of the EK-FAC factors
   (eigenvectors, corrected eigenvalues) that kronfluence and influencelab fit on 3,000 of those points.

Writes benchmarks/results/subnormal.csv (one row per measurement, with the date, PyTorch version and threads).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
TINY = 1.1754944e-38  # float32's smallest normal number


def matmul_worker(flush: bool) -> None:
    import time

    import torch

    if flush:
        assert torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 1568, generator=g), torch.randn(1568, 1568, generator=g)
    for name, x in (("normal", a), ("subnormal", a * 1e-39)):
        x @ b
        t0 = time.perf_counter()
        x @ b
        print(f"{name},{time.perf_counter() - t0}")


def subnormal_share(model, x, y) -> dict[str, float]:
    """Per-sample gradients ``s aᵀ`` of the CNN's Linear layers (summed loss, the given labels, as kronfluence's
    empirical Fisher): the share of points with a subnormal entry in either, and of subnormal entries."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    acts, grads = {}, {}
    def hook(m, inp, out) -> None:
        acts[m] = inp[0].detach()
        out.register_hook(lambda g: grads.__setitem__(m, g))

    hooks = [m.register_forward_hook(hook) for m in layers]
    try:
        out = model(x)
        F.cross_entropy(out, y, reduction="sum").backward()
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    any_point = torch.zeros(len(x), dtype=torch.bool)
    entries = total = 0
    for m in layers:
        for i in range(0, len(x), 250):  # [250, out, in] at a time
            g = grads[m][i:i + 250, :, None] * acts[m][i:i + 250, None, :]
            sub = (g != 0) & (g.abs() < TINY)
            any_point[i:i + 250] |= sub.flatten(1).any(1)
            entries, total = entries + int(sub.sum()), total + sub.numel()
    return {"share_points_subnormal": float(any_point.float().mean()), "share_entries_subnormal": entries / total}


def kronfluence_factors(model, data) -> dict:
    """kronfluence's EK-FAC factors (eigenvectors and corrected eigenvalues) fitted as ``peers.py`` fits them."""
    import tempfile

    sys.path.insert(0, str(HERE))
    import peers
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    with tempfile.TemporaryDirectory() as tmp:
        task = peers.classification_task()
        an = Analyzer("subnormal", prepare_model(copy.deepcopy(model), task), task, cpu=True,
                      disable_tqdm=True, output_dir=tmp, log_level=40)
        args = FactorArguments(strategy="ekfac")
        args.use_empirical_fisher = True
        an.fit_all_factors("f", data, per_device_batch_size=256, factor_args=args)
        return {f"{kind}/{module}": t for kind, per in an.load_all_factors("f").items() for module, t in per.items()}


def ours(model, data) -> dict:
    """influencelab's EK-FAC state (eigenvectors and corrected eigenvalues per block), fitted on the same data."""
    from influencelab import Attributor

    attr = Attributor(model, solver="ekfac", damping=1e-3, curvature="empirical_fisher", batch_size=256).fit(data)
    return dict(attr.solver.state_dict())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5000,20000")
    ap.add_argument("--matmul-worker", choices=["flush", "keep"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.matmul_worker:
        matmul_worker(args.matmul_worker == "flush")
        return
    import pandas as pd
    import torch
    from torch.utils.data import TensorDataset

    from influencelab.data.fashion_mnist import FashionMNIST
    from influencelab.models import cnn
    from influencelab.train import Trainer

    common = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    rows = []
    for mode in ("keep", "flush"):
        out = subprocess.run([sys.executable, __file__, "--matmul-worker", mode], capture_output=True, text=True,
                             check=True).stdout
        for line in out.split():
            inputs, seconds = line.split(",")
            rows.append({**common, "measurement": "matmul_2048x1568x1568", "denormals": mode, "inputs": inputs,
                         "seconds": float(seconds)})
            print(f"matmul, denormals {mode}, {inputs} inputs: {float(seconds):.3f} s", flush=True)
    for n in (int(s) for s in args.sizes.split(",")):
        train, _ = FashionMNIST(subset=n, label_noise=0.1, download=False).load()
        torch.manual_seed(0)
        model = cnn(10, 1, train.x.shape[-1])
        Trainer(epochs=2, batch_size=128, lr=1e-3, seed=0, device="cpu").fit(model, train)
        model.eval()
        rows.append({**common, "measurement": "trained_cnn_per_sample_gradients", "n_train": n,
                     **subnormal_share(model, train.x[:2000], train.targets[:2000])})
        print(f"CNN trained on {n}: {rows[-1]['share_points_subnormal']:.1%} of 2,000 training points have a "
              f"subnormal entry in a Linear layer's per-sample gradient ({rows[-1]['share_entries_subnormal']:.2%} "
              f"of the entries)", flush=True)
        fit = TensorDataset(train.x[:3000], train.targets[:3000])
        for impl, factors in (("kronfluence", kronfluence_factors(model, fit)), ("influencelab", ours(model, fit))):
            for name, t in factors.items():
                t = t.float()
                sub = int(((t != 0) & (t.abs() < TINY)).sum())
                rows.append({**common, "measurement": "ekfac_factors", "n_train": n, "impl": impl, "factor": name,
                             "entries": t.numel(), "subnormal_entries": sub})
            total = sum(r["subnormal_entries"] for r in rows if r.get("impl") == impl and r["n_train"] == n)
            print(f"  {impl}'s EK-FAC factors (fitted on 3,000 points): {total} subnormal entries", flush=True)
    out = Path(os.environ.get("INFLUENCELAB_BENCH_RESULTS", HERE / "results"))
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).astype({"n_train": "Int64"}).to_csv(out / "subnormal.csv", index=False)
    print(f"wrote {out / 'subnormal.csv'}")


if __name__ == "__main__":
    main()

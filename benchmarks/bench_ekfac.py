"""EK-FAC, K-FAC and identity: influencelab vs kronfluence on the same trained CNN and data, in the same process.

    python benchmarks/bench_ekfac.py [--n 20000] [--queries 100] [--batch 256] [--epochs 2] [--strategies ekfac]

FashionMNIST from Debian's dataset-fashion-mnist (falls back to digits), 10% flipped labels. Both use the
empirical Fisher and the same explicit damping, so their scores agree (Spearman printed). Prints a markdown
table of wall time per stage, ours / kronfluence (targets: fit + self <= 0.5, pairwise <= 0.5), and peak
memory; then the low-rank query compression (``score.query_rank``) against full rank, and, when CUDA is
present, the same stages on the GPU. Writes benchmarks/results/ekfac.csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

from influencelab.data.digits import Digits
from influencelab.data.fashion_mnist import FashionMNIST
from influencelab.errors import DataNotFoundError
from influencelab.models import cnn
from influencelab.scores import compress
from influencelab.solvers.ekfac import EKFAC, KFAC
from influencelab.solvers.identity import Identity
from influencelab.train import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from peers import kronfluence_run  # noqa: E402

DAMPING = 1e-3


def load(n: int):
    try:
        train, test = FashionMNIST(subset=n, label_noise=0.1, download=False).load()
        return "fashion_mnist", train, test
    except DataNotFoundError:
        train, test = Digits(subset=min(n, 1437), label_noise=0.1).load()
        return "digits", train, test


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


OURS = {"ekfac": EKFAC, "kfac": KFAC, "identity": Identity}


def ours(model, train, queries, batch, strategy="ekfac", device="cpu"):
    s = OURS[strategy](damping=DAMPING, curvature="empirical_fisher", batch_size=batch, device=device)
    _, fit = timed(lambda: s.fit(model, train))

    def self_scores():
        return torch.cat([s.self_influence(model, x, y, [DAMPING])[0] for x, y, _ in train.batches(batch)])

    sv, self_t = timed(self_scores)

    def pairwise():
        pre = s.prepare_queries(s.precondition(s.train_grads(model, queries.x, queries.targets), DAMPING))
        return torch.cat([s.pairwise(model, pre, x, y) for x, y, _ in train.batches(batch)], dim=1)

    pw, pair_t = timed(pairwise)
    return {"fit": fit, "self": self_t, "pairwise": pair_t}, sv, pw


def kronfluence(model, train, queries, batch, out_dir, strategy="ekfac", empirical=True, damping=DAMPING):
    """kronfluence on the CPU (its defaults, fp32): ({fit, self, pairwise} seconds, self scores, pairwise scores)."""
    times, sv, pw = kronfluence_run(model, TensorDataset(train.x, train.targets),
                                    TensorDataset(queries.x, queries.targets), out_dir, strategy, damping,
                                    empirical, batch)
    return times.seconds, sv, pw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--strategies", default="ekfac,kfac,identity")
    args = ap.parse_args()
    name, train, test = load(args.n)
    queries = test.subset(torch.arange(args.queries))
    torch.manual_seed(0)
    model = cnn(10, 1, train.x.shape[-1])
    Trainer(epochs=args.epochs, batch_size=128, lr=1e-3, seed=0, device="cpu").fit(model, train)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {len(train)} training points, {args.queries} queries, CNN with {n_params:,} parameters, "
          f"batch {args.batch}, {torch.get_num_threads()} threads", flush=True)
    csv_rows = []
    for strategy in args.strategies.split(","):
        print(f"\n### {strategy}\n", flush=True)
        t_ours, s_ours, p_ours = ours(model, train, queries, args.batch, strategy)
        mem_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows = [("influencelab", t_ours)]
        if not args.skip_peer:
            with tempfile.TemporaryDirectory() as tmp:
                t_k, s_k, p_k = kronfluence(model, train, queries, args.batch, tmp, strategy)
            rows.append(("kronfluence 1.0.1", t_k))
        print("| implementation | fit s | self s | fit + self s | pairwise s |\n|---|---|---|---|---|")
        for impl, t in rows:
            print(f"| {impl} | {t['fit']:.1f} | {t['self']:.1f} | {t['fit'] + t['self']:.1f} | {t['pairwise']:.1f} |")
            csv_rows.append([strategy, impl, len(train), t["fit"], t["self"], t["pairwise"]])
        if not args.skip_peer:
            r_fs = (t_ours["fit"] + t_ours["self"]) / max(t_k["fit"] + t_k["self"], 1e-9)
            r_pw = t_ours["pairwise"] / t_k["pairwise"]
            print(f"| **ratio ours / kronfluence** | {t_ours['fit'] / max(t_k['fit'], 1e-9):.2f} | "
                  f"{t_ours['self'] / t_k['self']:.2f} | **{r_fs:.2f}** (target <= 0.5) | **{r_pw:.2f}** "
                  f"(target <= 0.5) |")
            rho_s = spearmanr(s_ours.detach().numpy(), s_k.numpy()).statistic
            rho_p = spearmanr(p_ours.detach().flatten().numpy(), p_k.flatten().numpy()).statistic
            print(f"\nagreement: Spearman self {rho_s:.4f}, pairwise {rho_p:.4f}; peak RSS after ours "
                  f"{mem_ours:.0f} MB")
        if strategy == "ekfac":
            compression(model, train, queries, args.batch, p_ours)
    if torch.cuda.is_available():  # the GPU section (not in CI)
        print("\n### GPU (ours, EK-FAC)\n\n| device | fit s | self s | pairwise s |\n|---|---|---|---|")
        gpu_model = copy.deepcopy(model).cuda()
        t_gpu, _, _ = ours(gpu_model, train, queries, args.batch, "ekfac", device="cuda")
        print(f"| {torch.cuda.get_device_name()} | {t_gpu['fit']:.1f} | {t_gpu['self']:.1f} | {t_gpu['pairwise']:.1f} |")
        csv_rows.append(["ekfac", "influencelab cuda", len(train), t_gpu["fit"], t_gpu["self"], t_gpu["pairwise"]])
    out = Path(os.environ.get("INFLUENCELAB_BENCH_RESULTS", Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "ekfac.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "impl", "n", "fit_s", "self_s", "pairwise_s"])
        w.writerows(csv_rows)


def compression(model, train, queries, batch, full: torch.Tensor) -> None:
    """Pairwise scores from rank-r compressed preconditioned queries vs full rank: time, memory, correlation."""
    s = EKFAC(damping=DAMPING, curvature="empirical_fisher", batch_size=batch)
    s.fit(model, train)
    pre = s.precondition(s.train_grads(model, queries.x, queries.targets), DAMPING)
    print("\n| query_rank | pairwise s | query matrix MB | Spearman vs full | Pearson vs full |\n|---|---|---|---|---|")
    for r in (None, 64, 32, 8):
        basis, coef = compress(pre, r)

        def run(basis=basis, coef=coef):
            prepared = s.prepare_queries(basis)
            out = torch.cat([s.pairwise(model, prepared, x, y) for x, y, _ in train.batches(batch)], dim=1)
            return out if coef is None else coef @ out

        got, t = timed(run)
        rho = spearmanr(got.flatten().numpy(), full.flatten().numpy()).statistic
        pr = torch.corrcoef(torch.stack([got.flatten(), full.flatten()]))[0, 1].item()
        print(f"| {r or 'full'} | {t:.1f} | {basis.numel() * 4 / 2**20:.1f} | {rho:.4f} | {pr:.4f} |")

if __name__ == "__main__":
    main()

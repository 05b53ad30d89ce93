"""EK-FAC: influencelab vs kronfluence on the same trained CNN and data, in the same process.

    python benchmarks/bench_ekfac.py [--n 20000] [--queries 100] [--batch 256] [--epochs 2]

FashionMNIST from Debian's dataset-fashion-mnist (falls back to digits), 10% flipped labels. Both use the
empirical Fisher and the same explicit damping, so their scores agree (Spearman printed). Prints a markdown
table of wall time per stage, ours / kronfluence (targets: fit + self <= 0.5, pairwise <= 0.5), and peak
memory; writes benchmarks/results/ekfac.csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

from influencelab.data.digits import Digits
from influencelab.data.fashion_mnist import FashionMNIST
from influencelab.errors import DataNotFoundError
from influencelab.models import cnn
from influencelab.solvers.ekfac import EKFAC
from influencelab.train import Trainer

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


def ours(model, train, queries, batch):
    s = EKFAC(damping=DAMPING, curvature="empirical_fisher", batch_size=batch)
    _, fit = timed(lambda: s.fit(model, train))

    def self_scores():
        return torch.cat([s.self_influence(model, x, y, [DAMPING])[0] for x, y, _ in train.batches(batch)])

    sv, self_t = timed(self_scores)

    def pairwise():
        pre = s.precondition(s.train_grads(model, queries.x, queries.targets), DAMPING)
        return torch.cat([s.pairwise(model, pre, x, y) for x, y, _ in train.batches(batch)], dim=1)

    pw, pair_t = timed(pairwise)
    return {"fit": fit, "self": self_t, "pairwise": pair_t}, sv, pw


def kronfluence(model, train, queries, batch, out_dir):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    task = Classification()
    km = prepare_model(copy.deepcopy(model), task)
    an = Analyzer("bench", km, task, cpu=True, disable_tqdm=True, output_dir=out_dir, log_level=40)
    tr = TensorDataset(train.x, train.targets)
    qs = TensorDataset(queries.x, queries.targets)
    sargs = ScoreArguments(damping_factor=DAMPING)
    _, fit = timed(lambda: an.fit_all_factors("f", tr, per_device_batch_size=batch,
                                              factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True)))
    _, self_t = timed(lambda: an.compute_self_scores("s", "f", tr, per_device_train_batch_size=batch, score_args=sargs))
    _, pair_t = timed(lambda: an.compute_pairwise_scores("p", "f", qs, tr, per_device_query_batch_size=len(qs),
                                                         per_device_train_batch_size=batch, score_args=sargs))
    sv = an.load_self_scores("s")["all_modules"]
    pw = an.load_pairwise_scores("p")["all_modules"]
    return {"fit": fit, "self": self_t, "pairwise": pair_t}, sv, pw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--skip-peer", action="store_true")
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
    t_ours, s_ours, p_ours = ours(model, train, queries, args.batch)
    mem_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [("influencelab", t_ours)]
    if not args.skip_peer:
        with tempfile.TemporaryDirectory() as tmp:
            t_k, s_k, p_k = kronfluence(model, train, queries, args.batch, tmp)
        rows.append(("kronfluence 1.0.1", t_k))
    print("\n| implementation | fit s | self s | fit + self s | pairwise s |\n|---|---|---|---|---|")
    for impl, t in rows:
        print(f"| {impl} | {t['fit']:.1f} | {t['self']:.1f} | {t['fit'] + t['self']:.1f} | {t['pairwise']:.1f} |")
    if not args.skip_peer:
        r_fs = (t_ours["fit"] + t_ours["self"]) / (t_k["fit"] + t_k["self"])
        r_pw = t_ours["pairwise"] / t_k["pairwise"]
        print(f"| **ratio ours / kronfluence** | {t_ours['fit'] / t_k['fit']:.2f} | {t_ours['self'] / t_k['self']:.2f} "
              f"| **{r_fs:.2f}** (target <= 0.5) | **{r_pw:.2f}** (target <= 0.5) |")
        rho_s = spearmanr(s_ours.numpy(), s_k.numpy()).statistic
        rho_p = spearmanr(p_ours.flatten().numpy(), p_k.flatten().numpy()).statistic
        print(f"\nagreement: Spearman self {rho_s:.4f}, pairwise {rho_p:.4f}; peak RSS after ours {mem_ours:.0f} MB")
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        with open(out / "ekfac.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["impl", "n", "fit_s", "self_s", "pairwise_s"])
            for impl, t in rows:
                w.writerow([impl, len(train), t["fit"], t["self"], t["pairwise"]])


if __name__ == "__main__":
    main()

"""EK-FAC, K-FAC and identity: influencelab (its public ``Attributor``, the path the CLI's fit/self/pairwise stages
run) vs kronfluence (its ``Analyzer`` with its CPU defaults) on the same trained CNN, data and queries, back to
back in one process per setting.

    python benchmarks/bench_ekfac.py [--n 20000,60000] [--strategies ekfac] [--denormals flush,keep]
                                     [--peer-self-max 20000] [--compression]

FashionMNIST from Debian's dataset-fashion-mnist (falls back to digits), 10% flipped labels, the CNN trained 2
epochs; both sides use the empirical Fisher, λ = 1e-3 and batch 256, and their scores are compared (Spearman).
Pairwise scoring (100 queries) runs three times per side, back to back; the median is the figure, every run is
in the CSV.

``--denormals``: x86 CPUs compute on subnormal floats (|x| < 1.2e-38) about 100x slower, and the per-example
gradients of confidently classified points are subnormal: kronfluence's fp32 rotations of per-sample gradients
slow down with how well the model fits (its self-influence grew 11x for 4x the data). ``flush`` sets PyTorch's
flush-denormal mode (``torch.set_flush_denormal(True)``, before any thread starts: a thread pool started
earlier keeps its own setting) for both sides; ``keep`` is PyTorch's default. Each (n, setting) runs in a
process of its own. ``--peer-self-max``: above this n, kronfluence's self-influence is not run with subnormals
kept (it would take hours); the row says so.

Writes benchmarks/results/ekfac.csv (one row per implementation, n, strategy and setting, with the date, the
PyTorch and kronfluence versions and the thread count; peak memory = peak RSS above each stage's start) and,
with ``--compression``, benchmarks/results/ekfac_compression.csv (low-rank query compression vs full rank).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
DAMPING = 1e-3
BATCH = 256
N_QUERIES = 100
REPEATS = 3  # pairwise scoring runs per side (the first includes the queries' gradients and preconditioning)
COLUMNS = ["date", "torch", "kronfluence", "threads", "denormals", "n", "strategy", "impl", "fit_s", "self_s",
           "pairwise_s", "pairwise_runs_s", "peak_fit_mb", "peak_self_mb", "peak_pairwise_mb", "spearman_self",
           "spearman_pairwise", "note"]


def worker(args: argparse.Namespace) -> None:
    """One (n, denormals) setting: every strategy, ours then kronfluence, rows appended to ``args.out``."""
    import torch

    if args.denormals == "flush":  # first, before any thread pool exists
        assert torch.set_flush_denormal(True), "this CPU cannot flush denormals"
    import pandas as pd
    from scipy.stats import spearmanr
    from torch.utils.data import TensorDataset

    from influencelab import Attributor
    from influencelab.data.digits import Digits
    from influencelab.data.fashion_mnist import FashionMNIST
    from influencelab.errors import DataNotFoundError
    from influencelab.models import cnn
    from influencelab.train import Trainer

    sys.path.insert(0, str(HERE))
    from peers import StageTimes, dist_version, kronfluence_run, timed_stage

    try:
        train, test = FashionMNIST(subset=args.n, label_noise=0.1, download=False).load()
        name = "fashion_mnist"
    except DataNotFoundError:
        train, test = Digits(subset=min(args.n, 1437), label_noise=0.1).load()
        name = "digits"
    queries = test.subset(torch.arange(N_QUERIES))
    torch.manual_seed(0)
    model = cnn(10, 1, train.x.shape[-1])
    Trainer(epochs=args.epochs, batch_size=128, lr=1e-3, seed=0, device="cpu").fit(model, train)
    model.eval()
    common = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "kronfluence": dist_version("kronfluence"), "threads": torch.get_num_threads(),
              "denormals": args.denormals, "n": len(train)}
    print(f"{name}: {len(train)} training points, {N_QUERIES} queries, CNN with "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, batch {BATCH}, {common['threads']} threads, "
          f"denormals {args.denormals}", flush=True)

    def row(strategy: str, impl: str, t: StageTimes, **extra) -> dict:
        runs = [t.seconds[k] for k in t.seconds if k.startswith("pairwise")]
        return {**common, "strategy": strategy, "impl": impl, "fit_s": t.seconds.get("fit"),
                "self_s": t.seconds.get("self"), "pairwise_s": statistics.median(runs),
                "pairwise_runs_s": ";".join(f"{r:.3f}" for r in runs),
                **{f"peak_{k}_mb": t.peak_mb.get(k) for k in ("fit", "self")},
                "peak_pairwise_mb": max(v for k, v in t.peak_mb.items() if k.startswith("pairwise")), **extra}

    rows = []
    for strategy in args.strategies.split(","):
        attr = Attributor(model, solver=strategy, damping=DAMPING, curvature="empirical_fisher", batch_size=BATCH,
                          score_batch_size=BATCH)
        t = StageTimes()
        timed_stage(t, "fit", "cpu", lambda a=attr: a.fit(train))
        sv = timed_stage(t, "self", "cpu", lambda a=attr: a.self_influence())[0]
        for i in range(REPEATS):
            pw = timed_stage(t, "pairwise" if i == 0 else f"pairwise_{i + 1}", "cpu",
                             lambda a=attr: a.pairwise(queries))[0]
        rows.append(row(strategy, "influencelab", t))
        _report(rows[-1])
        if args.compression and strategy == "ekfac":
            compression(attr, queries, pw, common)
        if args.skip_peer:
            continue
        peer_self = args.denormals == "flush" or len(train) <= args.peer_self_max
        with tempfile.TemporaryDirectory() as tmp:
            tk, sk, pk = kronfluence_run(model, TensorDataset(train.x, train.targets),
                                         TensorDataset(queries.x, queries.targets), tmp, strategy, DAMPING,
                                         empirical=True, batch=BATCH, self_scores=peer_self, repeats=REPEATS)
        rho = lambda a, b: float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)  # noqa: E731
        rows.append(row(strategy, "kronfluence", tk, spearman_self=rho(sv, sk) if sk is not None else None,
                        spearman_pairwise=rho(pw, pk),
                        note="" if peer_self else "self-influence not run: n > --peer-self-max with subnormals"))
        _report(rows[-1])
    out = Path(args.out)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(out, mode="a", header=not out.exists(), index=False)



def _report(r: dict) -> None:
    sec = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    print(f"  {r['strategy']:8s} {r['impl']:12s} fit {sec(r['fit_s'])} s, self {sec(r['self_s'])} s, pairwise "
          f"{sec(r['pairwise_s'])} s (peak +{r['peak_pairwise_mb']:.0f} MB)", flush=True)


def compression(attr, queries, full, common: dict) -> None:
    """Pairwise scores from rank-r compressed preconditioned queries (``Attributor.pairwise(query_rank=r)``,
    the CLI's ``score.query_rank``) vs full rank: time, the query matrix's size, agreement."""
    import time

    import pandas as pd
    import torch
    from scipy.stats import spearmanr

    rows = []
    n_params = attr.solver.layout.size
    for r in (None, 64, 32, 8):
        t0 = time.perf_counter()
        got = attr.pairwise(queries, query_rank=r)[0]
        t = time.perf_counter() - t0
        k = min(r or N_QUERIES, N_QUERIES)
        rows.append({**common, "query_rank": r or "full", "pairwise_s": t,
                     "query_matrix_mb": k * n_params * 4 / 2**20,
                     "spearman_vs_full": float(spearmanr(got.flatten().numpy(), full.flatten().numpy()).statistic),
                     "pearson_vs_full": float(torch.corrcoef(torch.stack([got.flatten(), full.flatten()]))[0, 1])})
        print(f"  query_rank {rows[-1]['query_rank']}: pairwise {t:.1f} s, Spearman vs full "
              f"{rows[-1]['spearman_vs_full']:.4f}", flush=True)
    out = Path(os.environ.get("INFLUENCELAB_BENCH_RESULTS", HERE / "results")) / "ekfac_compression.csv"
    pd.DataFrame(rows).to_csv(out, index=False)


def table(csv: Path) -> str:
    """The ratios ours / kronfluence per (n, strategy, setting), as markdown."""
    import pandas as pd

    df = pd.read_csv(csv)
    df["fit_self_s"] = df["fit_s"] + df["self_s"]
    keys = ["n", "strategy", "denormals"]
    ours = df[df["impl"] == "influencelab"].set_index(keys)
    peer = df[df["impl"] == "kronfluence"].set_index(keys)
    lines = ["| n | strategy | denormals | fit + self s: ours / kronfluence | ratio (≤ 0.5) | pairwise s: ours / "
             "kronfluence | ratio (≤ 0.5) | Spearman self / pairwise |", "|---|---|---|---|---|---|---|---|"]
    for k, o in ours.iterrows():
        p = peer.loc[k] if k in peer.index else None
        f = lambda v: "–" if v is None or pd.isna(v) else f"{v:.1f}"  # noqa: E731
        g = lambda v: "–" if v is None or pd.isna(v) else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {f(o.fit_self_s)} / {f(None if p is None else p.fit_self_s)} | "
                     f"{g(None if p is None else o.fit_self_s / p.fit_self_s)} | {f(o.pairwise_s)} / "
                     f"{f(None if p is None else p.pairwise_s)} | "
                     f"{g(None if p is None else o.pairwise_s / p.pairwise_s)} | "
                     f"{g(None if p is None else p.spearman_self)} / {g(None if p is None else p.spearman_pairwise)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="20000", help="training-set sizes, comma-separated")
    ap.add_argument("--strategies", default="ekfac,kfac,identity")
    ap.add_argument("--denormals", default="flush,keep", help="flush, keep or both (see above)")
    ap.add_argument("--peer-self-max", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--compression", action="store_true")
    ap.add_argument("--out", default=None, help="CSV (default: benchmarks/results/ekfac.csv, replaced)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.n = int(args.n)
        worker(args)
        return
    out = Path(args.out or Path(os.environ.get("INFLUENCELAB_BENCH_RESULTS", HERE / "results")) / "ekfac.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial.csv")
    tmp.unlink(missing_ok=True)
    for n in args.n.split(","):
        for setting in args.denormals.split(","):
            cmd = [sys.executable, __file__, "--worker", "--n", n, "--denormals", setting, "--strategies",
                   args.strategies, "--peer-self-max", str(args.peer_self_max), "--epochs", str(args.epochs),
                   "--out", str(tmp), *(["--skip-peer"] if args.skip_peer else []),
                   *(["--compression"] if args.compression and setting == args.denormals.split(",")[0]
                     and n == args.n.split(",")[0] else [])]
            subprocess.run(cmd, check=True)
    tmp.replace(out)  # a finished benchmark replaces the committed file; an interrupted one leaves it alone
    print(f"\n{table(out)}\n\nwrote {out}")


if __name__ == "__main__":
    main()

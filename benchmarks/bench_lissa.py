"""LiSSA: influencelab vs dattri 0.3.0, the same recursion (depth, batch, scale, damping), queries and products.

    python benchmarks/bench_lissa.py [--n 1000] [--queries 10] [--depth 50] [--batch 32] [--damping 1e-2]

FashionMNIST (Debian's dataset-fashion-mnist; digits as fallback), the paper's CNN trained one epoch, Hessian
products. Both sides run ``h_0 = v, h_j = v + (I - (H_batch + λI) / s) h_{j-1}``, result ``h_depth / s``:

* influencelab through its product path, :class:`influencelab.Attributor` with solver ``lissa`` (composed from
  ``conf/solver/lissa.yaml`` with ``curvature=hessian``, ``depth``, ``batch_size``, ``damping``; ``scale=auto``
  gives ``s = 2 λ_max + λ``), timed over :meth:`Attributor.precondition` (``seconds``: it includes measuring
  the held-out residual; ``solve_seconds``: the recursion alone, from its diagnostics);
* dattri's ``ihvp_lissa`` with that same numeric ``s`` (``scaling=s``, ``damping=λ / s``: its update
  ``h = v + (1 - d) h - H h / s`` is then ours), in each of its autodiff modes (``rev-rev``, ``rev-fwd``).

Batch conventions: dattri draws its own batches per query vector (vmap, ``randomness="different"``);
influencelab shares one seeded batch stream across all queries ("shared", its default). "per-query" calls
influencelab once per query vector, so each query gets its own pass, as in dattri (same seed each call). The
figure is ours / the fastest dattri mode, for each convention. Also recorded: the relative difference of each
result from influencelab's shared one (all are stochastic; the "seed 1" row is the noise floor between two
batch streams), influencelab's diagnostics (held-out relative residual, converged) and, for every result, the
relative residual ``||(H + λI) x - v|| / ||v||`` with ``H`` the mean Hessian over the whole training set.

Writes every row to benchmarks/results/lissa.csv (or ``$INFLUENCELAB_BENCH_RESULTS``) and prints a markdown
table. ``--note`` goes into the CSV (e.g. that the cores were shared with other jobs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from influencelab import Attributor
from influencelab.compose import solver_config
from influencelab.data.base import LabeledData
from influencelab.solvers.curvature import Curvature

DATTRI_MODES = ("rev-rev", "rev-fwd")
COLUMNS = ["date", "torch", "threads", "note", "dataset", "n_train", "n_queries", "params", "depth", "batch",
           "damping", "scale", "implementation", "mode", "batch_convention", "seconds", "solve_seconds",
           "fit_seconds", "ratio_vs_dattri_fastest", "solve_ratio_vs_dattri_fastest", "rel_diff", "rel_diff_ref", "rel_residual_max", "rel_residual_full_max",
           "converged", "hvp_rel_diff"]


def prepare(n: int, queries: int) -> tuple[str, nn.Module, LabeledData, LabeledData]:
    """FashionMNIST (digits as fallback) and the CNN trained one epoch; returns (name, model, train, queries)."""
    from influencelab.data.digits import Digits
    from influencelab.data.fashion_mnist import FashionMNIST
    from influencelab.errors import DataNotFoundError
    from influencelab.models import cnn
    from influencelab.train import Trainer

    try:
        train, test = FashionMNIST(subset=n, download=False).load()
        name = "fashion_mnist"
    except DataNotFoundError:
        train, test = Digits(subset=min(n, 1437)).load()
        name = "digits"
    torch.manual_seed(0)
    model = cnn(10, 1, train.x.shape[-1])
    Trainer(epochs=1, batch_size=128, lr=1e-3, seed=0, device="cpu").fit(model, train)
    return name, model.eval(), train, test.subset(torch.arange(queries))


def _attributor(model: nn.Module, damping: float, depth: int, batch: int, seed: int) -> Attributor:
    """The product path: the ``lissa`` solver composed by name, as ``Attributor(model, solver="lissa", ...)``
    does (``Attributor``'s own ``batch_size`` is its gradient batch size, so LiSSA's goes into the config)."""
    solver = solver_config("lissa", {"damping": damping, "curvature": "hessian", "depth": depth,
                                     "batch_size": batch, "seed": seed}, device="cpu")
    return Attributor(model, solver=solver, score_batch_size=max(batch, 64))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of ``||a - b|| / ||b||``."""
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).mean())


def bench(model: nn.Module, train: LabeledData, queries: LabeledData, depth: int = 50, batch: int = 32,
          damping: float = 1e-2, modes: tuple[str, ...] | None = DATTRI_MODES, seed: int = 0,
          meta: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Time every implementation on the same query vectors; returns (CSV rows, results ``[k, P]`` in
    influencelab's layout by row label, plus the ``"query vectors"``). ``modes=None`` or ``()`` skips dattri."""
    attr = _attributor(model, damping, depth, batch, seed).fit(train)
    v = attr.query_gradients(queries)
    k = len(v)
    layout = attr.solver.layout
    n_params = sum(p.numel() for p in model.parameters())
    assert layout.size == n_params, "the benchmark compares full-model IHVPs: every parameter must be tracked"
    rows: list[dict[str, Any]] = []
    results: dict[str, torch.Tensor] = {}

    def row(label: str, impl: str, mode: str, convention: str, seconds: float, x: torch.Tensor, **extra: Any):
        results[label] = x
        rows.append({"implementation": impl, "mode": mode, "batch_convention": convention, "seconds": seconds,
                     "label": label, **extra})

    # influencelab, shared batch stream (its default)
    t0 = time.perf_counter()
    x = attr.precondition(v, damping)[0]
    t = time.perf_counter() - t0
    (conv,) = attr.diagnostics.values()
    scale = float(conv.scale)
    row("influencelab shared", "influencelab", "fwd-over-rev", "shared", t, x, solve_seconds=conv.solve_s,
        fit_seconds=attr.fit_seconds, rel_residual_max=conv.rel_residual_max, converged=conv.converged)

    # influencelab, one call (one pass over its own batches) per query vector
    parts, worst, ok, solve = [], 0.0, True, 0.0
    t0 = time.perf_counter()
    for i in range(k):
        parts.append(attr.precondition(v[i:i + 1], damping)[0])
        (c,) = attr.diagnostics.values()
        worst, ok, solve = max(worst, c.rel_residual_max), ok and c.converged, solve + c.solve_s
    t = time.perf_counter() - t0
    row("influencelab per-query", "influencelab", "fwd-over-rev", "per-query", t, torch.cat(parts),
        solve_seconds=solve, rel_residual_max=worst, converged=ok)

    # the noise floor: influencelab, shared, another seed's batch stream
    other = _attributor(model, damping, depth, batch, seed + 1).fit(train)
    t0 = time.perf_counter()
    x1 = other.precondition(v, damping)[0]
    t = time.perf_counter() - t0
    (c1,) = other.diagnostics.values()
    row("influencelab shared seed+1", f"influencelab (seed {seed + 1})", "fwd-over-rev", "shared", t, x1,
        solve_seconds=c1.solve_s, rel_residual_max=c1.rel_residual_max, converged=c1.converged)

    curv = Curvature(attr.model, layout, "hessian", attr.task)
    if modes:
        from dattri.func.hessian import hvp, ihvp_lissa

        net = attr.model
        names = [nm for nm, _ in net.named_parameters()]
        shapes = [p.shape for _, p in net.named_parameters()]
        sizes = [p.numel() for _, p in net.named_parameters()]
        theta = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])

        def loss(th: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            p = {nm: s.reshape(sh) for nm, s, sh in zip(names, th.split(sizes), shapes, strict=True)}
            return F.cross_entropy(functional_call(net, p, (xb,)), yb.long())

        def to_param(flat: torch.Tensor) -> torch.Tensor:
            d = layout.unflatten(flat, net)
            return torch.cat([d[nm].reshape(len(flat), -1) for nm in names], dim=1)

        def to_layout(mat: torch.Tensor) -> torch.Tensor:
            return layout.flatten({nm: s.reshape(len(mat), *sh)
                                   for nm, s, sh in zip(names, mat.split(sizes, dim=1), shapes, strict=True)})

        v_param = to_param(v)
        # labels as floats, as dattri's own IFAttributorLiSSA collates them (rev-fwd needs float inputs)
        data = (theta, train.x, train.targets.float())
        xb, yb = train.x[:batch], train.targets[:batch]
        ours_hv = curv.product(v[:1], xb, yb)
        for mode in modes:
            # dattri's update h = v + (1 - d) h - H h / s is ours with d = λ / s
            ihvp = ihvp_lissa(loss, argnums=0, batch_size=batch, recursion_depth=depth, damping=damping / scale,
                              scaling=scale, mode=mode)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            xd = ihvp(data, v_param, in_dims=(None, 0, 0))
            t = time.perf_counter() - t0
            # the same Hessian-vector product on one batch, as a check that both differentiate the same loss
            hv = to_layout(hvp(loss, argnums=0, mode=mode)((theta, xb, yb.float()), v_param[0])[None])
            row(f"dattri {mode}", "dattri 0.3.0", mode, "per-query", t, to_layout(xd.detach()),
                hvp_rel_diff=_rel(hv, ours_hv))

    # every result's relative residual against the whole training set's mean Hessian (one stacked pass)
    labels = list(results)
    X = torch.cat([results[lb] for lb in labels])
    R = torch.cat([v] * len(labels)) - (curv.mean_product(X, train, max(batch, 64)) + damping * X)
    full = (R.norm(dim=1) / torch.cat([v] * len(labels)).norm(dim=1)).reshape(len(labels), k).max(dim=1).values
    ref = results["influencelab shared"]
    peer = [r["seconds"] for r in rows if r["implementation"].startswith("dattri")]
    fastest = min(peer) if peer else float("nan")
    base = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "note": "", "dataset": "", "n_train": len(train), "n_queries": k,
            "params": n_params, "depth": depth, "batch": batch, "damping": damping, "scale": scale, **(meta or {})}
    out = []
    for r, f in zip(rows, full.tolist(), strict=True):
        label = r.pop("label")
        same = label == "influencelab shared"
        out.append({**base, **r, "ratio_vs_dattri_fastest": r["seconds"] / fastest,
                    "solve_ratio_vs_dattri_fastest": r.get("solve_seconds", float("nan")) / fastest,
                    "rel_diff": float("nan") if same else _rel(results[label], ref),
                    "rel_diff_ref": "" if same else "influencelab shared", "rel_residual_full_max": f})
    results["query vectors"] = v
    return [{c: r.get(c, float("nan")) for c in COLUMNS} for r in out], results


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(path, index=False)
    return path


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| implementation | mode | batches | query IHVPs s | / dattri fastest | recursion only s | / dattri fastest "
             "| rel. diff vs ours shared | held-out residual (max) | full-data residual (max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def f(x: Any, spec: str) -> str:
        return "–" if x != x else format(x, spec)  # NaN -> dash

    for r in rows:
        lines.append(f"| {r['implementation']} | {r['mode']} | {r['batch_convention']} | {r['seconds']:.2f} | "
                     f"{f(r['ratio_vs_dattri_fastest'], '.3f')} | {f(r['solve_seconds'], '.2f')} | "
                     f"{f(r['solve_ratio_vs_dattri_fastest'], '.3f')} | {f(r['rel_diff'], '.3f')} | "
                     f"{f(r['rel_residual_max'], '.3f')} | {r['rel_residual_full_max']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--modes", default=",".join(DATTRI_MODES), help="dattri autodiff modes, comma-separated")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--note", default="", help="free text for the CSV's note column")
    args = ap.parse_args()
    name, model, train, queries = prepare(args.n, args.queries)
    modes = () if args.skip_peer else tuple(m for m in args.modes.split(",") if m)
    rows, _ = bench(model, train, queries, args.depth, args.batch, args.damping, modes,
                    meta={"dataset": name, "note": args.note})
    r0 = rows[0]
    print(f"{name}: {r0['n_train']} training points, {r0['n_queries']} queries, depth {r0['depth']}, batch "
          f"{r0['batch']}, damping {r0['damping']}, scale {r0['scale']:.4g} (= 2 λ_max + λ), {r0['params']:,} "
          f"parameters, {r0['threads']} threads\n")
    print(markdown(rows))
    out = Path(os.environ.get("INFLUENCELAB_BENCH_RESULTS", Path(__file__).parent / "results")) / "lissa.csv"
    print(f"\nwrote {write_csv(rows, out)}")


if __name__ == "__main__":
    main()

"""The paper-size Sec. 6.2 run (issue 29 item 7): ResNet-18 trained on 5,000 FashionMNIST points, the IHVP
``(G + λI)^-1 g_q`` of 16 test queries at every damping λ = 1e-6 … 10 by EK-FAC, K-FAC, LiSSA (tuned as users tune
it), LiSSA + EK-FAC, CG + EK-FAC and Arnoldi, each against the exact reference (``solver=gram``: Woodbury on the
Gram matrix of the curvature's rows, float64, every damping from one eigendecomposition, its relative residual
measured per damping). Per solver and damping: relative error and cosine to the reference, the Spearman
correlation of the solver's pairwise scores with the reference's over all training points, each as mean and
quartiles over the queries, and fit / solve times.

    bash benchmarks/gpu/prepare.sh                          # here (no GPU): wheels + FashionMNIST -> .gpu_carry/
    python benchmarks/gpu/sec62_paper.py --tiny --out DIR   # anywhere, CPU, < 1 min (tests/test_gpu_script.py)

and, through the device tool (one call; about 9 minutes of device time with the machine's start)::

    run(command="bash benchmarks/gpu/sec62.sh", carry=[".gpu_carry"], timeout_s=480)

``sec62.sh`` installs the carried wheels (hydra-core, omegaconf, antlr4: the solvers' YAML is composed by Hydra)
into /tmp/site and runs this script with what is left of ``BUDGET=420`` seconds (``BUDGET=...`` changes it,
``ARGS=...`` adds arguments, e.g. ``ARGS="--n-curv 1000"`` for a rerun whose reference must be quicker), writing
to ``$OUT`` (the files come back under the reply's ``files_at``):

* ``sec62.csv``: one row per solver x damping (mean and quartiles of rel_error, cosine, spearman over queries; the
  solver's own residual, iterations, scale and rule where it is iterative; the reference's residual at that
  damping; fit and solve seconds; ``error`` names a solver that failed or ran out of budget, its numbers NaN);
* ``sec62_queries.csv``: per solver, damping and query: rel_error, cosine, spearman;
* ``reference.csv``: per damping the reference's worst and mean relative residual, converged (<= 1e-6), solve s;
* ``env.json``: device (the card's name), torch, sizes, training accuracy, the phases' seconds and peak memory,
  every solver's keyword arguments, the plan below; ``nvidia-smi.csv`` and ``sec62.log`` (from sec62.sh).

Copy them into the repository afterwards, e.g. ``cp <files_at>/* experiments/results/ihvp_resnet18_gpu/``.

**The plan (what fits one ~7-minute command on one H100/H200).** The reference's Gram matrix is ``(n C) x (n C)``
for the ``n`` points the curvature ``G`` is taken over (``C = 10`` classes). Over all 5,000 training points that is
50,000 x 50,000 float64 (20 GB; its eigendecomposition and the per-layer Gram assembly, whose temporaries are as
large, need ~100 GB and minutes): too much for one call. So the model is trained on all 5,000 points, and the IHVP
compared is the damped curvature over a seeded sample ``S`` of ``--n-curv 2000`` of them: 20,000 x 20,000 float64
(3.2 GB; the rows kept per layer as inputs x output gradients, ~10 GB, on the GPU; eigh on the GPU in seconds).
*Every* solver is fitted on the same ``S`` (so every error is against the exact solution of the same system);
the pairwise scores whose Spearman correlation is reported are over all 5,000 training points (what users see).
This split is why the script drives the Python API (``Attributor`` with each solver by name, its YAML composed by
Hydra, so the options are the CLI's) rather than ``python -m influencelab experiment=ihvp``: the CLI fits every
solver on the training set it trains on. ``--n-curv 5000`` (``--budget`` and a call of its own on an H200) runs
the full-size system. Estimated (not yet measured) on an H100: training ~10 s; the reference ~2-3 min (rows in
float64, the factored Gram of the 7 x 7 first stage ~1-1.5 min, eigh, the residuals' float64 GGN products); EK-FAC
and K-FAC seconds; LiSSA and LiSSA + EK-FAC ~1 min each (2,000 recursion steps for 8 dampings x 16 queries = 128
vectors at once); Arnoldi ~20 s; CG + EK-FAC <= 100 products over S; each solver's scores over 5,000 points a few s.
Work is ordered so that a run cut short keeps what matters most: training, the reference (the run stops if it
fails or overruns), then EK-FAC, K-FAC, LiSSA, Arnoldi, LiSSA + EK-FAC, CG + EK-FAC (``--solvers``); each
solver's rows are written as soon as it is done, and one that overruns the budget (an alarm; ``--solver-cap``
bounds any one) or fails gets rows with its error.
The settings (``SOLVERS`` below; ``--set LABEL.KEY=VALUE`` changes one):

* LiSSA and LiSSA + EK-FAC, the documented tuned rule: ``scale=search`` (per damping the smallest of 1, 10, 100, …
  whose recursion does not diverge), ``depth=auto`` (ceil(n / repeats)), ``repeats=4`` (depth x repeats = n),
  batch 32; the rule applied is in the ``rule`` column;
* CG + EK-FAC: EK-FAC-preconditioned CG with exact GGN products over ``S``, at most 100 iterations (tol 1e-6);
* Arnoldi: top 50 eigenpairs from 100 iterations, complement dropped (the paper's);
* EK-FAC / K-FAC: their defaults (true Fisher, one sampled label per point).

TF32 is off (``--tf32`` turns it on): cuDNN's default TF32 convolutions would put a ~1e-3 floor under every float32
solver's error. The solvers run in float32, the reference in float64 (its own YAML).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from influencelab import Attributor
from influencelab.data.base import LabeledData
from influencelab.train import Trainer, evaluate

DAMPINGS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
TUNED_LISSA = {"scale": "search", "depth": "auto", "repeats": 4, "batch_size": 32}
#: label -> (solver name in conf/solver, keyword arguments), in the order they run
SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ekfac": ("ekfac", {}),
    "kfac": ("kfac", {}),
    "lissa": ("lissa", dict(TUNED_LISSA)),
    "arnoldi": ("arnoldi", {"top_k": 50, "complement": "drop", "jacobian_cache_gb": 0.0}),
    "lissa_ekfac": ("lissa_ekfac", dict(TUNED_LISSA)),
    "cg_ekfac": ("cg_ekfac", {"max_iter": 100, "batch_size": 64, "jacobian_cache_gb": 0.0}),
}
#: --tiny: the same solvers at toy iteration counts (seconds on a CPU)
TINY_ARGS: dict[str, dict[str, Any]] = {"lissa": {"batch_size": 8}, "lissa_ekfac": {"batch_size": 8},
                                        "arnoldi": {"top_k": 10}, "cg_ekfac": {"max_iter": 8}}
QUARTILES = ("q25", "median", "q75")
COLUMNS = ["solver", "solver_name", "damping", "n_queries", "n_train", "n_curv",
           *[f"{m}{s}" for m in ("rel_error", "cosine", "spearman") for s in ("", *[f"_{q}" for q in QUARTILES])],
           "fit_s", "solve_all_s", "solve_s", "score_s", "rel_residual", "rel_residual_mean", "converged",
           "iterations", "scale", "rule", "ref_rel_residual", "ref_rel_residual_mean", "ref_converged",
           "peak_mb", "kwargs", "error"]
QUERY_COLUMNS = ["solver", "damping", "query", "rel_error", "cosine", "spearman"]
REF_COLUMNS = ["damping", "rel_residual", "rel_residual_mean", "tol", "converged", "residual_on", "solve_s"]


# -- sizes, data, model --------------------------------------------------------------------------------------------
def sizes(args: argparse.Namespace) -> dict[str, Any]:
    """The run's sizes (``--tiny``: toy sizes for the CPU; explicit flags win)."""
    tiny = args.tiny

    def pick(flag: Any, full: Any, small: Any) -> Any:
        return flag if flag is not None else (small if tiny else full)

    return {"n_train": pick(args.n_train, 5000, 96), "n_curv": pick(args.n_curv, 2000, 24),
            "queries": pick(args.queries, 16, 3), "epochs": pick(args.epochs, 5, 2),
            "train_batch": 128 if not tiny else 16, "score_batch": 64 if not tiny else 32,
            "data": args.data or ("synthetic" if tiny else "fashion_mnist"), "image_size": 28, "classes": 10}


def load_data(sz: dict[str, Any], seed: int) -> tuple[LabeledData, LabeledData]:
    """(train, test): FashionMNIST (``dataset.subset`` as the CLI takes it) or seeded synthetic 1 x 28 x 28 images."""
    if sz["data"] == "fashion_mnist":
        from influencelab.data.fashion_mnist import FashionMNIST

        root = os.environ.get("INFLUENCELAB_DATA", "data")
        return FashionMNIST(root=root, subset=sz["n_train"], image_size=sz["image_size"], download=False,
                            seed=seed).load()
    g = torch.Generator().manual_seed(seed)

    def synth(n: int) -> LabeledData:
        y = torch.randint(0, sz["classes"], (n,), generator=g)
        # class-dependent means, so training learns something and the curvature is a trained model's
        x = torch.randn(n, 1, sz["image_size"], sz["image_size"], generator=g) + 0.5 * y.view(-1, 1, 1, 1)
        return LabeledData(x, y, y.clone(), torch.arange(n), sz["classes"])

    return synth(sz["n_train"]), synth(max(64, sz["queries"]))


def build_model(tiny: bool, classes: int) -> torch.nn.Module:
    """timm's ResNet-18 as the CLI builds it (``model=resnet18``); ``--tiny``: the same architecture narrowed."""
    if tiny:
        import timm

        return timm.create_model("resnet18", num_classes=classes, in_chans=1, channels=(4, 8, 16, 16))
    from influencelab.models import timm_model

    return timm_model("resnet18", classes, 1, 28)


def seeded_positions(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` of ``range(n)``, seeded, sorted (the CLI's query draw)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(k, n)].sort().values


# -- measurement helpers ---------------------------------------------------------------------------------------------
class Deadline:
    """Seconds left for the whole run; an alarm interrupts a phase that would overrun it (or its own ``cap``)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def run(self, fn: Callable[[], Any], cap: float | None = None) -> Any:
        limit = self.left() if cap is None else min(self.left(), cap)
        if limit <= 0:
            raise TimeoutError("out of budget (--budget)")
        if not hasattr(signal, "SIGALRM"):
            return fn()

        def stop(*_):
            raise TimeoutError(f"out of budget (--budget, or --solver-cap {cap:g} s)" if cap else
                               "out of budget (--budget)")

        old = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


class Clock:
    """Wall time (synchronised with the device) and peak device memory of one phase."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Clock:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.peak_mb = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else math.nan


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summary(values: np.ndarray, name: str) -> dict[str, float]:
    """Mean and quartiles over the queries (NaN-free values; a NaN anywhere shows as NaN)."""
    q25, q50, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return {name: float(values.mean()), f"{name}_q25": float(q25), f"{name}_median": float(q50),
            f"{name}_q75": float(q75)}


def score_matrix(X: torch.Tensor, grads: Callable[[], Any]) -> np.ndarray:
    """``X [m, P] @ g_z`` for every training point ``z`` (float64): ``[m, n_train]``."""
    Xd = X.double()
    out = [Xd @ g.double().T for g in grads()]
    return torch.cat(out, 1).cpu().numpy()


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([spearmanr(a[i], b[i]).statistic for i in range(len(a))], dtype=np.float64)


class Writer:
    """CSV files under OUT, rows appended as they come (a run cut short keeps what it finished)."""

    def __init__(self, out: Path):
        self.out = out
        for name, cols in (("sec62.csv", COLUMNS), ("sec62_queries.csv", QUERY_COLUMNS),
                           ("reference.csv", REF_COLUMNS)):
            with open(out / name, "w", newline="") as f:
                csv.writer(f).writerow(cols)

    def rows(self, name: str, cols: list[str], rows: list[dict[str, Any]]) -> None:
        with open(self.out / name, "a", newline="") as f:
            w = csv.DictWriter(f, cols)
            for r in rows:
                w.writerow({k: r.get(k, "") for k in cols})


# -- the run ---------------------------------------------------------------------------------------------------------
def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``LABEL.KEY=VALUE`` (VALUE as YAML: numbers, null, true, lists) -> {label: {key: value}}."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, sep, value = item.partition("=")
        label, dot, key = head.partition(".")
        if not sep or not dot or label not in SOLVERS:
            raise SystemExit(f"--set {item!r} is invalid: use LABEL.KEY=VALUE with LABEL one of {', '.join(SOLVERS)}")
        out.setdefault(label, {})[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "sec62_out"), help="where the CSVs and env.json go")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (a narrowed ResNet-18, synthetic data)")
    ap.add_argument("--device", default=None, help="default: cuda when available (--tiny: cpu)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (alarm-enforced)")
    ap.add_argument("--solver-cap", type=float, default=None, help="seconds at most for any one solver")
    ap.add_argument("--n-train", type=int, default=None, help="training points (default 5000; --tiny 96)")
    ap.add_argument("--n-curv", type=int, default=None,
                    help="points the curvature G is taken over, a seeded sample of the training set (default 2000, "
                         "a 20,000 x 20,000 reference Gram; --tiny 24)")
    ap.add_argument("--queries", type=int, default=None, help="test queries (default 16; --tiny 3)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 5; --tiny 2)")
    ap.add_argument("--data", choices=["fashion_mnist", "synthetic"], default=None)
    ap.add_argument("--dampings", default=",".join(f"{d:g}" for d in DAMPINGS))
    ap.add_argument("--solvers", default=",".join(SOLVERS), help="labels of SOLVERS, in the order to run them")
    ap.add_argument("--set", action="append", default=[], metavar="LABEL.KEY=VALUE",
                    help="a solver's keyword argument (e.g. cg_ekfac.max_iter=50); repeatable")
    ap.add_argument("--score-points", type=int, default=None,
                    help="score the Spearman over this many training points (default: all)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions (default: off)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    sz = sizes(args)
    dampings = [float(d) for d in args.dampings.split(",")]
    labels = [s for s in args.solvers.split(",") if s]
    bad = [s for s in labels if s not in SOLVERS]
    if bad:
        raise SystemExit(f"--solvers {','.join(bad)} is invalid: use labels of {', '.join(SOLVERS)}")
    overrides = parse_set(args.set)
    kwargs = {lab: {**SOLVERS[lab][1], **(TINY_ARGS.get(lab, {}) if args.tiny else {}), **overrides.get(lab, {})}
              for lab in labels}
    deadline = Deadline(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu")
    env: dict[str, Any] = {
        "device": name, "device_memory_gb": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda
        else None, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(), "tiny": args.tiny,
        "tf32": args.tf32, "dampings": dampings, "solvers": {lab: [SOLVERS[lab][0], kwargs[lab]] for lab in labels},
        "argv": sys.argv[1:] if argv is None else argv, **sz, "phases": {},
        "plan": __doc__.split("**The plan")[1].split("\n\n")[0].strip(" *:.\n") if "**The plan" in __doc__ else ""}

    def save_env() -> None:
        (out / "env.json").write_text(json.dumps(env, indent=1, default=str))

    save_env()
    writer = Writer(out)
    print(f"device {name}, torch {torch.__version__}; n_train {sz['n_train']}, n_curv {sz['n_curv']}, "
          f"{sz['queries']} queries, dampings {dampings}, solvers {labels}", flush=True)

    def setup() -> tuple:
        """Training, the query gradients and the reference (one alarm-guarded phase)."""
        # 1. data and the trained model
        with Clock(device) as c:
            train, test = load_data(sz, args.seed)
            torch.manual_seed(args.seed)
            model = build_model(args.tiny, sz["classes"])
            Trainer(epochs=sz["epochs"], batch_size=sz["train_batch"], lr=1e-3, seed=args.seed,
                    device=str(device)).fit(model, train)
            model = model.to(device).eval()
        acc = {f"train_{k}": v for k, v in evaluate(model, train).items()}
        query_pos = seeded_positions(len(test), sz["queries"], args.seed)
        queries, query_ids = test.subset(query_pos), query_pos.tolist()  # (query: its position in the test set)
        curv = train.subset(seeded_positions(len(train), sz["n_curv"], args.seed + 1))
        scored = train if args.score_points is None else train.subset(
            seeded_positions(len(train), args.score_points, args.seed + 2))
        acc.update({f"test_{k}": v for k, v in evaluate(model, test).items()})
        env["phases"]["train"] = {"s": c.seconds, "peak_mb": c.peak_mb}
        env.update(acc, n_params=sum(p.numel() for p in model.parameters()), gram_rank=len(curv) * sz["classes"],
                   n_scored=len(scored))
        save_env()
        print(f"trained {sz['epochs']} epochs on {len(train)} points in {c.seconds:.1f} s: {acc}", flush=True)

        # gradients: the queries' (the measurement) and, per scoring pass, every scored training point's (float32)
        grad_attr = Attributor(model, solver="identity", device=str(device), score_batch_size=sz["score_batch"])
        grad_attr.fit(curv)  # (identity: nothing to fit; resolves the tracked layers)
        gsolver, gmodel = grad_attr.solver, grad_attr.model
        grads = grad_attr.query_gradients(queries)  # [k, P] float32
        k = len(grads)

        def train_grads():
            for xb, yb, _ in scored.batches(sz["score_batch"]):
                yield gsolver.train_grads(gmodel, xb, yb)

        # 2. the exact reference on S, every damping from one fit: [d, k, P] float64, kept on the host
        with Clock(device) as c:
            ref = Attributor(model, solver="gram", damping=dampings, device=str(device),
                             max_rank=max(20_000, len(curv) * sz["classes"]))
            ref.fit(curv)
            fit_s = time.perf_counter() - c.t0
            xref = ref.precondition(grads.double(), dampings)
            ref_diag = dict(ref.diagnostics)
            del ref
            free(device)
            ref_scores = score_matrix(xref.reshape(len(dampings) * k, -1), train_grads)  # [d k, n_scored]
            xref = xref.cpu()
        env["phases"]["reference"] = {"s": c.seconds, "fit_s": fit_s, "peak_mb": c.peak_mb}
        ref_rows = []
        for d in dampings:
            conv = ref_diag.get(d)
            ref_rows.append({"damping": d, "rel_residual": conv.rel_residual_max if conv else math.nan,
                             "rel_residual_mean": conv.rel_residual_mean if conv else math.nan,
                             "tol": conv.tol if conv else math.nan, "converged": conv.converged if conv else "",
                             "residual_on": conv.residual_on if conv else "", "solve_s": conv.solve_s if conv else ""})
        writer.rows("reference.csv", REF_COLUMNS, ref_rows)
        save_env()
        print(f"reference (gram, {len(curv) * sz['classes']:,} x {len(curv) * sz['classes']:,}) in {c.seconds:.1f} s; "
              "relative residual per damping: " + ", ".join(f"{r['damping']:g}: {r['rel_residual']:.2e}"
                                                             for r in ref_rows), flush=True)
        return model, train, curv, query_ids, grads, train_grads, xref, ref_scores, ref_rows

    try:
        model, train, curv, query_ids, grads, train_grads, xref, ref_scores, ref_rows = deadline.run(setup)
    except Exception as e:
        env["error"] = f"setup (training, queries, reference): {type(e).__name__}: {e}"[:1000]
        save_env()
        raise
    k = len(grads)
    ref_by_d = {r["damping"]: r for r in ref_rows}

    # 3. the solvers, one at a time; each writes its rows at once
    for lab in labels:
        solver_name, kw = SOLVERS[lab][0], kwargs[lab]
        base = {"solver": lab, "solver_name": solver_name, "n_queries": k, "n_train": len(train),
                "n_curv": len(curv), "kwargs": json.dumps(kw, default=str)}
        try:
            rows, qrows = deadline.run(partial(measure, lab, solver_name, kw, model, curv, grads, xref, ref_scores,
                                               dampings, train_grads, device, base, env, query_ids), args.solver_cap)
        except Exception as e:  # noqa: BLE001 - one solver's failure must not end the run
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]
            if not isinstance(e, TimeoutError):
                traceback.print_exc()
            rows = [{**base, "damping": d, "error": msg} for d in dampings]
            qrows = []
        for r in rows:
            ref_r = ref_by_d[r["damping"]]
            r.update(ref_rel_residual=ref_r["rel_residual"], ref_rel_residual_mean=ref_r["rel_residual_mean"],
                     ref_converged=ref_r["converged"])
        writer.rows("sec62.csv", COLUMNS, rows)
        writer.rows("sec62_queries.csv", QUERY_COLUMNS, qrows)
        save_env()
        free(device)
        for r in rows:
            print(f"  {lab:12s} λ={r['damping']:<7g} rel_error {r.get('rel_error', math.nan):9.3g} "
                  f"(median {r.get('rel_error_median', math.nan):9.3g})  cosine {r.get('cosine', math.nan):7.4f}  "
                  f"spearman {r.get('spearman', math.nan):7.4f}  {r.get('error', '')}", flush=True)
    env["left_s"] = deadline.left()
    save_env()
    print(f"done with {deadline.left():.0f} s of the budget left; rows in {out / 'sec62.csv'}", flush=True)
    return 0


def measure(lab: str, solver_name: str, kw: dict[str, Any], model: torch.nn.Module, curv: LabeledData,
            grads: torch.Tensor, xref: torch.Tensor, ref_scores: np.ndarray, dampings: list[float],
            train_grads: Callable[[], Any], device: torch.device, base: dict[str, Any], env: dict[str, Any],
            query_ids: list[int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One solver fitted on ``curv``, its IHVPs at every damping against the reference's, and its scores' Spearman
    against the reference's: (rows per damping, rows per damping and query)."""
    k = len(grads)
    with Clock(device) as cf:
        attr = Attributor(model, solver=solver_name, damping=dampings, device=str(device), **kw)
        attr.fit(curv)
    with Clock(device) as cs:
        X = attr.precondition(grads, dampings)  # [d, k, P]
    diag = dict(attr.diagnostics)
    del attr
    free(device)
    with Clock(device) as cq:
        mine = score_matrix(X.reshape(len(dampings) * k, -1), train_grads)
    env["phases"][lab] = {"fit_s": cf.seconds, "solve_s": cs.seconds, "score_s": cq.seconds,
                          "peak_mb": max(cf.peak_mb, cs.peak_mb, cq.peak_mb)}
    rows, qrows = [], []
    for j, d in enumerate(dampings):
        x, t = X[j].double(), xref[j].to(X.device)
        errs = ((x - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-300)).cpu().numpy()
        coss = torch.nn.functional.cosine_similarity(x, t, dim=1).cpu().numpy()
        rhos = spearman_rows(mine[j * k:(j + 1) * k], ref_scores[j * k:(j + 1) * k])
        conv = diag.get(d)
        row = {**base, "damping": d, **summary(errs, "rel_error"), **summary(coss, "cosine"),
               **summary(rhos, "spearman"), "fit_s": cf.seconds, "solve_all_s": cs.seconds,
               "solve_s": conv.solve_s if conv is not None and conv.solve_s else cs.seconds / len(dampings),
               "score_s": cq.seconds / len(dampings), "peak_mb": env["phases"][lab]["peak_mb"]}
        if conv is not None:
            row.update(rel_residual=conv.rel_residual_max, rel_residual_mean=conv.rel_residual_mean,
                       converged=conv.converged, iterations=conv.iterations,
                       scale=conv.scale if conv.scale is not None else "", rule=getattr(conv, "rule", None) or "")
        rows.append(row)
        qrows += [{"solver": lab, "damping": d, "query": q, "rel_error": float(e), "cosine": float(c),
                   "spearman": float(r)} for q, e, c, r in zip(query_ids, errs, coss, rhos, strict=True)]
    return rows, qrows


if __name__ == "__main__":
    sys.exit(main())

"""dattri's MNIST-10 benchmark protocol (logistic regression and its MLP) reproduced on mnist_5k, with
influencelab's methods and dattri's own implementations of the same methods scored on the same models, data and
LDS ground truth, in the same process back to back (issue #33, item 2).

    OMP_NUM_THREADS=1 python experiments/dattri_protocol.py            # the committed run (CSV notes say the sizes)
    python experiments/dattri_protocol.py --tiny --out /tmp/x          # seconds: the test's mode

dattri's recipe (dattri 0.x package source: ``dattri.benchmark.datasets.mnist``, ``dattri.script.dattri_retrain``,
``dattri.model_util.retrain.retrain_lds``, its ``experiments/benchmark_result.py``), and what differs here:

* data: dattri takes the first 5,000 MNIST training images and 500 test images (normalised with 0.1307 / 0.3081).
  mnist_5k has 5,000 real MNIST training digits in all, so here: a stratified 4,500 train / 500 test split of them
  (influencelab's own split, ``split_seed`` 0), same normalisation. 4,500 training points, not 5,000.
* models: dattri's own ``LogisticRegressionMnist`` (784 -> 10) and ``MLPMnist`` (784-128-64-10, ReLU, dropout 0.1),
  trained with dattri's recipe: SGD lr 0.01, LR 20 epochs batch 32, MLP 50 epochs batch 64 momentum 0.9. The loop
  here batches in-memory tensors (a seeded permutation per epoch) instead of a DataLoader: same optimisation.
* LDS ground truth: ``retrain_lds``'s defaults (``--subsets``, default 100, of half of the training set, 1 model
  each; target: minus the test loss, as ``calculate_lds_ground_truth``), the same for every method. Cached under
  ``--cache`` keyed by a hash of the recipe. LDS per test point: Spearman over subsets of the summed scores against
  the target (``dattri.metric.lds``, here ``influencelab.stages.lds.lds_per_query``).
* method settings (dattri ``benchmark_result.py``): CG ``max_iter`` 10; LiSSA ``recursion_depth`` 100, batch 100,
  scaling 50; Arnoldi ``max_iter`` 50 (its ``proj_dim`` capped at the iterations: 50 eigenpairs); TRAK-M: M models
  trained on random halves (``models_half``), projection 512 (normal), no regularisation; TracIn: 10 independently
  trained full models as its "checkpoints", each weighted 1e-3. influencelab only: EK-FAC averaged over 10 full-data
  models (``ekfac-ens-10``) and over TRAK-M's own M half-data models (``ekfac-halves-M``, MLP: TRAK-M's
  models, with EK-FAC's influence function where TRAK has its projected kernel; CG's, ``cg-halves-M``, for the
  smallest M only: ten CG fits cost minutes here). dattri searches the regularisation
  per method on the test points; here one damping per model (``--damping``), the same for every IF method of both libraries. dattri's
  IF/Arnoldi/LiSSA/CG use the Hessian: influencelab's runs use ``curvature=hessian`` for those; EK-FAC of both on the
  empirical Fisher (the training labels, what dattri's EK-FAC gets from its loss).

Two dattri behaviours this protocol runs into (dattri as installed; see ``run.json`` for its version):

* ``TracInAttributor`` always projects the gradients to 512 random (normal) dimensions (its
  ``DEFAULT_PROJECTOR_KWARGS`` apply when ``projector_kwargs`` is None), so dattri's "TracIn" rows are projected
  TracIn; influencelab's are the exact sum over the same checkpoints (tests/test_dattri_protocol.py checks it against
  torch.func).
* ``IFAttributorEKFAC`` rotates into the Kronecker eigenbases with ``q_s @ G @ q_a.T`` where ``torch.linalg.eigh``
  returns eigenvectors as columns (EK-FAC needs ``q_s.T @ G @ q_a``), in its eigenvalue correction and its inverse
  alike: a preconditioner with corrected eigenvalues in another basis, not EK-FAC. influencelab's EK-FAC equals EK-FAC
  written out densely (the test); on a bias-free logistic regression dattri's scores differ from it by up to 1.5x the
  largest score.

Every influencelab / dattri pair runs on the same model weights and data, one after the other, each timed (fit +
scores; ``cpu_seconds``: this process's CPU time, the comparison that holds on a shared machine; ``seconds``: wall
clock; one thread). dattri's tasks get copies of the models (its AttributionTask loads checkpoints into the model it
is given, in place), and every method is checked to leave the shared models' weights unchanged. Outputs under ``--out``: ``lds.csv`` (per method: LDS mean, 95% bootstrap interval
over test points, seconds), ``paired.csv`` (influencelab minus dattri, and each method minus TRAK, paired over test
points, scipy.stats.bootstrap), ``times.csv``, ``mislabel.csv`` (MLP, 10% flipped labels, self-influence AUC).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's progress bars

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from influencelab import Attributor  # noqa: E402
from influencelab.data.mnist_5k import load_raw, stratified_split  # noqa: E402
from influencelab.evaluation import paired_difference, roc_auc_bootstrap  # noqa: E402
from influencelab.stages.lds import lds_per_query, summarize  # noqa: E402
from influencelab.train import Checkpoint, set_checkpoints  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = 0.1307, 0.3081  # dattri's MNIST normalisation
#: dattri's training recipe per model (dattri.benchmark.datasets.mnist.train_mnist_*; batch: dattri_retrain)
RECIPE = {"lr": {"epochs": 20, "batch": 32, "lr": 0.01, "momentum": 0.0},
          "mlp": {"epochs": 50, "batch": 64, "lr": 0.01, "momentum": 0.9}}


@dataclass
class Setup:
    """What the ground truth and the models depend on (its hash keys the cache)."""

    model: str
    n_test: int = 500
    split_seed: int = 0
    n_train: int | None = None  # None: all 4,500 (tiny mode: fewer)
    subsets: int = 100
    fraction: float = 0.5
    runs_per_subset: int = 1
    seed: int = 0
    epochs: int | None = None  # None: dattri's
    recipe: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.recipe = {**RECIPE[self.model], **({"epochs": self.epochs} if self.epochs else {})}

    def key(self, what: str) -> str:
        return hashlib.sha256(json.dumps({**asdict(self), "what": what}, sort_keys=True).encode()).hexdigest()[:16]


def load_data(setup: Setup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels = load_raw()
    tr, te = stratified_split(labels, setup.n_test, setup.split_seed)
    if setup.n_train is not None:
        tr = tr[: setup.n_train]
    x = ((torch.from_numpy(images).float() / 255 - MEAN) / STD).unsqueeze(1)
    y = torch.from_numpy(labels).long()
    return x[tr], y[tr], x[te], y[te]


def new_model(kind: str) -> nn.Module:
    from dattri.benchmark.models.logistic_regression import LogisticRegressionMnist
    from dattri.benchmark.models.mlp import MLPMnist
    return LogisticRegressionMnist() if kind == "lr" else MLPMnist()


def train(kind: str, recipe: dict, x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """dattri's training recipe on in-memory tensors (a seeded permutation per epoch)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = new_model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"])
    model.train()
    for _ in range(recipe["epochs"]):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), recipe["batch"]):
            b = perm[s:s + recipe["batch"]]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return model.eval()


def cached(path: Path, make):
    if path.exists():
        return torch.load(path, weights_only=True)
    out = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return out


def ground_truth(setup: Setup, data, cache: Path) -> dict[str, torch.Tensor]:
    """dattri's retrain_lds + calculate_lds_ground_truth: ``masks`` [S, n_train] (the subsets), ``target``
    [S, n_test] = minus the test loss of the model(s) trained on each subset (mean over runs)."""
    xtr, ytr, xte, yte = data

    def make():
        n = len(ytr)
        k = int(n * setup.fraction)
        masks = torch.zeros(setup.subsets, n, dtype=torch.bool)
        target = torch.zeros(setup.subsets, len(yte), dtype=torch.float64)
        for i in range(setup.subsets):
            idx = np.random.default_rng(setup.seed + i).choice(n, k, replace=False)
            masks[i, idx] = True
            for r in range(setup.runs_per_subset):
                m = train(setup.model, setup.recipe, xtr[idx], ytr[idx], setup.seed + 7919 * (r + 1) + i)
                with torch.no_grad():
                    target[i] -= nn.functional.cross_entropy(m(xte), yte, reduction="none").double()
            target[i] /= setup.runs_per_subset
        return {"masks": masks, "target": target}

    return cached(cache / f"truth_{setup.model}_{setup.key('truth')}.pt", make)


def trained_models(setup: Setup, data, cache: Path, n_full: int, n_half: int, tag: str = "",
                   labels: torch.Tensor | None = None) -> tuple[list[nn.Module], list[nn.Module]]:
    """``n_full`` models on all training points (seeds 0..; dattri's ``models_full``) and ``n_half`` on random
    halves (dattri's ``models_half``, for TRAK), cached as state dicts."""
    xtr, ytr, _, _ = data
    ytr = ytr if labels is None else labels
    n = len(ytr)

    def make():
        full = [train(setup.model, setup.recipe, xtr, ytr, 100 + s).state_dict() for s in range(n_full)]
        half = []
        for s in range(n_half):
            idx = np.random.default_rng(10_000 + s).choice(n, n // 2, replace=False)
            half.append(train(setup.model, setup.recipe, xtr[idx], ytr[idx], 200 + s).state_dict())
        return {"full": full, "half": half}

    states = cached(cache / f"models{tag}_{setup.model}_{setup.key(f'models{tag}:{n_full}:{n_half}')}.pt", make)

    def build(sd):
        m = new_model(setup.model)
        m.load_state_dict(sd)
        return m.eval()

    return [build(s) for s in states["full"]], [build(s) for s in states["half"]]


# -- dattri -----------------------------------------------------------------------------------------------------
def _dattri_task(model: nn.Module, states, per_example: bool, margin: bool = False):
    """dattri's AttributionTask loads each checkpoint into the model it is given (load_state_dict, in place): it
    gets a copy of the model and of the states, so the models shared with influencelab stay as trained."""
    from dattri.task import AttributionTask
    model = copy.deepcopy(model)
    states = [{k: v.detach().clone() for k, v in sd.items()} for sd in states] if isinstance(states, list) \
        else {k: v.detach().clone() for k, v in states.items()}

    def loss(params, data):
        x, y = data[0], data[1].long()  # (dattri's LiSSA hands the labels over as floats)
        if per_example:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        out = torch.func.functional_call(model, params, x)
        if margin:  # dattri benchmark's loss_trak: log(p / (1 - p))
            logp = -nn.functional.cross_entropy(out, y)
            return logp - torch.log(1 - torch.exp(logp))
        return nn.functional.cross_entropy(out, y)

    return AttributionTask(loss_func=loss, model=model, checkpoints=states)



def _dattri_trak(half: list[nn.Module]):
    """dattri's TRAKAttributor over the models ``half`` (its correct-class probability, 512 projected dimensions)."""
    from dattri.algorithm.trak import TRAKAttributor

    def prob(params, data):
        x, y = data
        out = torch.func.functional_call(half[0], params, x.unsqueeze(0))
        return torch.exp(-nn.functional.cross_entropy(out, y.unsqueeze(0)))

    task = _dattri_task(half[0], [h.state_dict() for h in half], per_example=True, margin=True)
    return TRAKAttributor(task=task, correct_probability_func=prob, device="cpu",
                          projector_kwargs={"proj_dim": 512, "device": "cpu"})

def dattri_scores(method: str, ctx: dict) -> np.ndarray:
    """[n_query, n_train] scores of dattri's implementation (positive = helpful)."""
    from dattri.algorithm.influence_function import (
        IFAttributorArnoldi,
        IFAttributorCG,
        IFAttributorEKFAC,
        IFAttributorExplicit,
        IFAttributorLiSSA,
    )
    from dattri.algorithm.tracin import TracInAttributor
    model, lam = ctx["model"], ctx["damping"]
    train_ds, query_ds = ctx["train_ds"], ctx["query_ds"]
    full = DataLoader(train_ds, batch_size=len(train_ds), shuffle=False)
    train_loader = DataLoader(train_ds, batch_size=500, shuffle=False)
    test_loader = DataLoader(query_ds, batch_size=500, shuffle=False)
    if method.startswith("trak"):
        m = int(method.split("-")[1])
        att = _dattri_trak(ctx["half"][:m])
        att.cache(train_loader)
        with torch.no_grad():
            return att.attribute(test_loader).T.numpy()
    if method == "tracin":
        cps = ctx["full"][:ctx["tracin_models"]]
        task = _dattri_task(cps[-1], [c.state_dict() for c in cps], per_example=True)
        att = TracInAttributor(task=task, weight_list=torch.ones(len(cps)) * 1e-3, normalized_grad=False,
                               device="cpu")
        with torch.no_grad():
            return att.attribute(train_loader, test_loader).T.numpy()
    task = _dattri_task(model, model.state_dict(), per_example=False)
    if method == "ekfac":
        att = IFAttributorEKFAC(task=task, device="cpu", damping=lam)
    elif method == "cg":
        att = IFAttributorCG(task=task, device="cpu", regularization=lam, max_iter=ctx["cg_iters"])
    elif method == "lissa":  # dattri's damping d at scaling s solves (H + s d I)
        att = IFAttributorLiSSA(task=task, device="cpu", batch_size=ctx["lissa_batch"], recursion_depth=ctx["lissa_depth"],
                                damping=lam / ctx["lissa_scale"], scaling=ctx["lissa_scale"])
    elif method == "arnoldi":
        att = IFAttributorArnoldi(task=task, device="cpu", regularization=lam, proj_dim=ctx["arnoldi_k"],
                                  max_iter=ctx["arnoldi_iters"])
    elif method == "exact":
        att = IFAttributorExplicit(task=task, device="cpu", regularization=lam)
    else:
        raise ValueError(method)
    att.cache(full)
    with torch.no_grad():
        return att.attribute(train_loader, test_loader).T.numpy()


# -- influencelab -----------------------------------------------------------------------------------------------
def influencelab_scores(method: str, ctx: dict) -> np.ndarray:
    lam = ctx["damping"]
    common = {"score_batch_size": 500}
    if method.startswith("trak"):
        m = int(method.split("-")[1])
        att = Attributor(ctx["half"][:m], solver="trak", damping=0.0, proj_dim=512, projection="gaussian", **common)
    elif method == "tracin":
        cps = ctx["full"][:ctx["tracin_models"]]
        model = new_model(ctx["kind"])
        model.load_state_dict(cps[-1].state_dict())
        model.eval()
        set_checkpoints(model, [Checkpoint(i + 1, 1e-3, c.state_dict()) for i, c in enumerate(cps)])
        att = Attributor(model, solver="tracin", **common)
    elif method.startswith("ekfac-ens"):
        m = int(method.split("-")[2])
        att = Attributor(ctx["full"][:m], solver="ekfac", damping=lam, curvature="empirical_fisher", **common)
    elif "-halves-" in method:  # the same M models TRAK-M averages over (each on a random half)
        base, m = method.split("-halves-")
        models = ctx["half"][:int(m)]
        if base == "cg":
            att = Attributor(models, solver="cg", damping=lam, curvature="hessian", max_iter=ctx["cg_iters"], tol=1e-7,
                             **common)
        else:
            att = Attributor(models, solver=base, damping=lam, curvature="empirical_fisher", **common)
    elif method in ("ekfac", "kfac"):
        att = Attributor(ctx["model"], solver=method, damping=lam, curvature="empirical_fisher", **common)
    elif method == "cg":
        att = Attributor(ctx["model"], solver="cg", damping=lam, curvature="hessian", max_iter=ctx["cg_iters"],
                         tol=1e-7, **common)
    elif method == "lissa":
        att = Attributor(ctx["model"], solver="lissa", damping=lam, curvature="hessian", depth=ctx["lissa_depth"],
                         batch_size=ctx["lissa_batch"], scale=ctx["lissa_scale"], repeats=1, **common)
    elif method == "arnoldi":
        att = Attributor(ctx["model"], solver="arnoldi", damping=lam, curvature="hessian", top_k=ctx["arnoldi_k"],
                         n_iters=ctx["arnoldi_iters"], **common)
    else:
        raise ValueError(method)
    att.fit(ctx["train_ds"])
    return att.pairwise(ctx["query_ds"])[0].double().numpy()


DATTRI_HAS = {"ekfac", "cg", "lissa", "arnoldi", "tracin"}
#: dattri only: its explicit (dense Hessian solve) IF; influencelab's ``exact`` eigendecomposes the 7,850^2 matrix to
#: serve every damping (minutes here), a test reference rather than a method to time against dattri's solve
DATTRI_ONLY = {"exact"}


def method_list(kind: str, trak_ms: list[int], ens: int) -> list[str]:
    methods = ["ekfac", "kfac", "cg", "lissa", "arnoldi"] + (["exact"] if kind == "lr" else [])
    methods += [f"trak-{m}" for m in trak_ms] + ["tracin"]
    if kind == "mlp" and ens > 1:
        methods.append(f"ekfac-ens-{ens}")
    if kind == "mlp":  # an influence-function ensemble over TRAK's own models: the like-for-like configuration
        methods += [f"ekfac-halves-{m}" for m in trak_ms if m > 1]
        methods += [f"cg-halves-{m}" for m in [min(trak_ms, default=0)] if m > 1]
    return methods


def libraries(method: str) -> tuple[str, ...]:
    if method in DATTRI_ONLY:
        return ("dattri",)
    return ("influencelab", "dattri") if method in DATTRI_HAS or method.startswith("trak") else ("influencelab",)


def _fingerprint(ctx: dict) -> list[float]:
    """Every shared model's weights, summarised (checked unchanged after each method)."""
    with torch.no_grad():
        return [float(sum(p.double().abs().sum() for p in m.parameters())) for m in [*ctx["full"], *ctx["half"]]]


def run_model(kind: str, args, cache: Path, notes: str) -> tuple[list[dict], list[dict], list[dict], dict]:
    setup = Setup(model=kind, subsets=args.subsets_mlp if kind == "mlp" and args.subsets_mlp else args.subsets,
                  n_train=args.n_train, epochs=args.epochs)
    data = load_data(setup)
    xtr, ytr, xte, yte = data
    t0 = time.perf_counter()
    truth = ground_truth(setup, data, cache)
    t_truth = time.perf_counter() - t0
    trak_ms = [int(m) for m in (args.trak_mlp if kind == "mlp" and args.trak_mlp else args.trak).split(",") if m]
    n_half = max(trak_ms, default=0)
    ens = args.ensemble if kind == "mlp" else 0
    t0 = time.perf_counter()
    full, half = trained_models(setup, data, cache, max(args.tracin_models, ens, 1), n_half)
    t_models = time.perf_counter() - t0
    nq = min(args.queries_lr if kind == "lr" else args.queries_mlp, len(yte))
    q = torch.from_numpy(np.sort(np.random.default_rng(1).choice(len(yte), nq, replace=False)))
    ctx = {"kind": kind, "model": full[0], "full": full, "half": half, "damping": args.damping[kind],
           "train_ds": TensorDataset(xtr, ytr), "query_ds": TensorDataset(xte[q], yte[q]),
           "tracin_models": args.tracin_models, "cg_iters": args.cg_iters, "lissa_depth": args.lissa_depth,
           "lissa_batch": args.lissa_batch, "lissa_scale": args.lissa_scale, "arnoldi_k": args.arnoldi_iters,
           "arnoldi_iters": args.arnoldi_iters}
    masks, target = truth["masks"].double(), truth["target"][:, q].T  # [n_query, S]
    with torch.no_grad():
        acc = float((full[0](xte).argmax(1) == yte).float().mean())
    lds_rows, time_rows, per = [], [], {}
    keep = set(args.methods.split(",")) if args.methods else None
    for method in [m for m in method_list(kind, trak_ms, ens) if keep is None or m in keep]:
        for lib in libraries(method):
            if f"{lib}:{method}" in args.skip.split(","):
                continue
            fn = influencelab_scores if lib == "influencelab" else dattri_scores
            settings = {k: v for k, v in ctx.items() if isinstance(v, (int, float, str))}
            where = cache / "scores" / f"{kind}_{lib}_{method}_{setup.key(json.dumps([settings, nq, lib, method]))}.pt"
            failed = where.with_suffix(".failed.json")  # a method that raised: its error, kept like scores
            if failed.exists():
                error = json.loads(failed.read_text())
                print(f"[{kind}] {lib} {method}: FAILED (cached) {error['error']}", flush=True)
                time_rows.append({"model": kind, "method": method, "library": lib, "seconds": float("nan"),
                                  "cpu_seconds": float("nan"), **error})
                continue
            if where.exists():  # a finished method of an interrupted run: its scores and the times it took then
                got = torch.load(where, weights_only=True)
                scores, sec, cpu = got["scores"].numpy(), float(got["seconds"]), float(got["cpu_seconds"])
            elif args.cached_only:
                time_rows.append({"model": kind, "method": method, "library": lib, "seconds": float("nan"),
                                  "cpu_seconds": float("nan"), "error": "not run: beyond this run's CPU budget"})
                continue
            else:
                before = _fingerprint(ctx)
                t, c = time.perf_counter(), time.process_time()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        scores = fn(method, ctx)
                except Exception as e:  # noqa: BLE001 - a peer's failure is a row, not the end of the run
                    print(f"[{kind}] {lib} {method}: FAILED {type(e).__name__}: {e}", flush=True)
                    error = {"error": f"{type(e).__name__}: {e}"[:200]}
                    time_rows.append({"model": kind, "method": method, "library": lib, "seconds": float("nan"),
                                      "cpu_seconds": float("nan"), **error})
                    failed.parent.mkdir(parents=True, exist_ok=True)
                    failed.write_text(json.dumps(error))
                    continue
                sec, cpu = time.perf_counter() - t, time.process_time() - c
                if _fingerprint(ctx) != before:
                    raise RuntimeError(f"{lib} {method} changed the shared models' weights")
                record = {"scores": torch.as_tensor(np.asarray(scores, dtype=np.float64)),
                          "seconds": torch.tensor(sec), "cpu_seconds": torch.tensor(cpu)}
                cached(where, lambda record=record: record)
            bad = int((~np.isfinite(np.asarray(scores, dtype=np.float64))).sum())
            if bad:  # (dattri's Arnoldi on the LR: a Ritz value below 0 under its sqrt makes every score NaN)
                print(f"[{kind}] {lib} {method}: FAILED {bad} of {np.size(scores)} scores not finite", flush=True)
                time_rows.append({"model": kind, "method": method, "library": lib, "seconds": sec,
                                  "cpu_seconds": cpu, "error": f"failed: {bad:,} of {np.size(scores):,} scores NaN"})
                continue
            pred = torch.from_numpy(np.asarray(scores, dtype=np.float64)) @ masks.T  # [n_query, S]
            vals = lds_per_query(pred, target, dropna=False)
            per[(method, lib)] = vals
            s = summarize(vals, 2000, 0)
            print(f"[{kind}] {lib:12s} {method:12s} LDS {s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] "
                  f"{sec:7.1f} s wall {cpu:7.1f} s cpu", flush=True)
            lds_rows.append({"model": kind, "method": method, "library": lib, "lds": s["mean"],
                             "ci_low": s["ci_low"], "ci_high": s["ci_high"], "lds_std": s["std"], "n_query": s["n"],
                             "seconds": sec, "cpu_seconds": cpu, "damping": ctx["damping"] if not method.startswith(("trak", "tracin"))
                             else 0.0, "notes": notes})
            time_rows.append({"model": kind, "method": method, "library": lib, "seconds": sec, "cpu_seconds": cpu,
                              "error": ""})
    paired_rows = []
    for (method, lib), vals in per.items():
        if lib == "influencelab" and (method, "dattri") in per:
            d = paired_difference(vals, per[(method, "dattri")], n_boot=2000, seed=0)
            paired_rows.append({"model": kind, "a": f"influencelab {method}", "b": f"dattri {method}", **d})
    trak_ref = f"trak-{max(trak_ms)}" if trak_ms else None
    for (method, lib), vals in per.items():
        for ref_lib in ("influencelab", "dattri"):
            ref = per.get((trak_ref, ref_lib))
            if ref is None or method == trak_ref:
                continue
            if ref_lib == "dattri" and lib != "dattri":
                continue
            if ref_lib == "influencelab" and lib != "influencelab":
                continue
            d = paired_difference(vals, ref, n_boot=2000, seed=0)
            paired_rows.append({"model": kind, "a": f"{lib} {method}", "b": f"{ref_lib} {trak_ref}", **d})
    info = {"model": kind, "test_accuracy": acc, "n_train": len(ytr), "n_test": len(yte), "n_query": nq,
            "subsets": setup.subsets, "runs_per_subset": setup.runs_per_subset, "truth_seconds": t_truth,
            "models_seconds": t_models, "damping": ctx["damping"]}
    print(json.dumps(info), flush=True)
    return lds_rows, paired_rows, time_rows, {"ctx": ctx, "setup": setup, "data": data, "info": info}


def mislabel(args, cache: Path, notes: str) -> list[dict]:
    """MLP with 10% of the training labels flipped (to another class, seeded): self-influence of each training
    point, AUC of telling the flipped ones (dattri's noisy-label detection), per method and library."""
    setup = Setup(model="mlp", subsets=args.subsets_mlp or args.subsets, n_train=args.n_train, epochs=args.epochs)
    xtr, ytr, xte, yte = load_data(setup)
    rng = np.random.default_rng(42)
    n = len(ytr)
    flip = np.sort(rng.choice(n, n // 10, replace=False))
    noisy = ytr.clone()
    noisy[flip] = (ytr[flip] + torch.from_numpy(rng.integers(1, 10, len(flip)))) % 10
    flipped = np.zeros(n, dtype=bool)
    flipped[flip] = True
    trak_m = args.mislabel_trak
    full, half = trained_models(setup, (xtr, ytr, xte, yte), cache, 1, trak_m, tag="_noisy", labels=noisy)
    ds = TensorDataset(xtr, noisy)
    lam = args.damping["mlp"]
    rows = []

    def add(method, lib, fn):
        where = cache / "scores" / f"mislabel_{lib}_{method}_{setup.key(json.dumps([lam, args.cg_iters, trak_m]))}.pt"
        if where.exists():
            got = torch.load(where, weights_only=True)
            s, sec, cpu = got["scores"].numpy(), float(got["seconds"]), float(got["cpu_seconds"])
        elif args.cached_only:
            return
        else:
            t, c = time.perf_counter(), time.process_time()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    s = np.asarray(fn(), dtype=np.float64).ravel()
            except Exception as e:  # noqa: BLE001
                print(f"[mislabel] {lib} {method}: FAILED {type(e).__name__}: {e}", flush=True)
                return
            sec, cpu = time.perf_counter() - t, time.process_time() - c
            record = {"scores": torch.as_tensor(s), "seconds": torch.tensor(sec), "cpu_seconds": torch.tensor(cpu)}
            cached(where, lambda record=record: record)
        auc, lo, hi = _auc(s, flipped)
        print(f"[mislabel] {lib:12s} {method:10s} AUC {auc:.3f} [{lo:.3f}, {hi:.3f}] {cpu:.1f} s cpu", flush=True)
        rows.append({"model": "mlp", "method": method, "library": lib, "auc": auc, "ci_low": lo, "ci_high": hi,
                     "seconds": sec, "cpu_seconds": cpu, "flipped": int(flipped.sum()), "n_train": n, "notes": notes})

    model = full[0]
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(xtr), noisy, reduction="none").numpy()
    rows.append({"model": "mlp", "method": "loss", "library": "baseline",
                 **dict(zip(("auc", "ci_low", "ci_high"), _auc(loss, flipped))), "seconds": 0.0,
                 "flipped": int(flipped.sum()), "n_train": n, "notes": notes})
    # (CG/LiSSA self-influence: one solve per training point, 4,500 here: beyond this CPU budget)
    for method, kw in (("ekfac", {"curvature": "empirical_fisher"}), ("kfac", {"curvature": "empirical_fisher"})):
        add(method, "influencelab", lambda method=method, kw=kw: Attributor(
            model, solver=method, damping=lam, score_batch_size=500, **kw).fit(ds).self_influence()[0].numpy())
    add(f"trak-{trak_m}", "influencelab", lambda: Attributor(
        half, solver="trak", damping=0.0, proj_dim=512, projection="gaussian", score_batch_size=500).fit(
        ds).self_influence()[0].numpy())

    def dattri_self(kind):
        from dattri.algorithm.influence_function import IFAttributorEKFAC
        loader = DataLoader(ds, batch_size=500, shuffle=False)
        if kind == "trak":
            att = _dattri_trak(half)
            with torch.no_grad():  # (its self_attribute fits the kernel on the loader it gets, uncached)
                return att.self_attribute(loader)
        task = _dattri_task(model, model.state_dict(), per_example=False)
        att = IFAttributorEKFAC(task=task, damping=lam)
        whole = DataLoader(ds, batch_size=n, shuffle=False)
        att.cache(whole)
        with torch.no_grad():  # (with batches of 500 its self_attribute mismatches 4,500 vs 500)
            return att.self_attribute(whole)
    add("ekfac", "dattri", lambda: dattri_self("ekfac"))
    add(f"trak-{trak_m}", "dattri", lambda: dattri_self("trak"))
    return rows


def _auc(scores, flipped) -> tuple[float, float, float]:
    """ROC AUC of telling the flipped points by a high score, and its stratified bootstrap interval."""
    lo, hi = roc_auc_bootstrap(scores, flipped, n_boot=1000, seed=0)
    return float(roc_auc_score(flipped, scores)), lo, hi


def table(out: Path) -> str:
    """The markdown table of RESULTS from the CSVs under ``out`` (``--table``)."""
    lds = pd.read_csv(out / "lds.csv")
    paired = pd.read_csv(out / "paired.csv")
    rows = ["| model | method | influencelab LDS [95% CI] | dattri LDS [95% CI] | influencelab − dattri [95% CI] "
            "| CPU s influencelab / dattri |", "|---|---|---|---|---|---|"]
    fmt = "{:.3f} [{:.3f}, {:.3f}]"
    for (model, method), g in lds.groupby(["model", "method"], sort=False):
        by = {r["library"]: r for _, r in g.iterrows()}
        cell = {lib: fmt.format(r["lds"], r["ci_low"], r["ci_high"]) if lib in by else "—"
                for lib, r in ((lib, by.get(lib)) for lib in ("influencelab", "dattri"))}
        d = paired[(paired["model"] == model) & (paired["a"] == f"influencelab {method}")
                   & (paired["b"] == f"dattri {method}")]
        diff = fmt.format(*d.iloc[0][["diff", "ci_low", "ci_high"]]) if len(d) else "—"
        cpu = " / ".join(f"{by[lib]['cpu_seconds']:.1f}" if lib in by else "—" for lib in ("influencelab", "dattri"))
        rows.append(f"| {model} | {method} | {cell['influencelab']} | {cell['dattri']} | {diff} | {cpu} |")
    text = "\n".join(rows)
    vs = paired[paired["b"].str.contains("trak")]
    if len(vs):
        text += "\n\n| model | method | − TRAK (same library) [95% CI] |\n|---|---|---|\n"
        text += "\n".join(f"| {r['model']} | {r['a']} − {r['b'].split()[-1]} | "
                           f"{fmt.format(r['diff'], r['ci_low'], r['ci_high'])} |" for _, r in vs.iterrows())
    if (out / "mislabel.csv").exists():
        mis = pd.read_csv(out / "mislabel.csv")
        text += "\n\n| MLP, 10% flipped: self-influence | library | ROC AUC [95% CI] | CPU s |\n|---|---|---|---|\n"
        text += "\n".join(f"| {r['method']} | {r['library']} | {fmt.format(r['auc'], r['ci_low'], r['ci_high'])} "
                           f"| {r.get('cpu_seconds', float('nan')):.1f} |" for _, r in mis.iterrows())
    return text


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lr,mlp")
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--queries-lr", type=int, default=500)
    ap.add_argument("--queries-mlp", type=int, default=100)
    ap.add_argument("--damping-lr", type=float, default=0.1)
    ap.add_argument("--damping-mlp", type=float, default=0.1)
    ap.add_argument("--subsets-mlp", type=int, default=None, help="the MLP's (default: --subsets)")
    ap.add_argument("--trak", default="10,50", help="TRAK ensemble sizes M (models on random halves)")
    ap.add_argument("--trak-mlp", default=None, help="the MLP's (default: --trak)")
    ap.add_argument("--tracin-models", type=int, default=10)
    ap.add_argument("--ensemble", type=int, default=10, help="MLP: influencelab EK-FAC over this many full models")
    ap.add_argument("--cg-iters", type=int, default=10)
    ap.add_argument("--lissa-depth", type=int, default=100)
    ap.add_argument("--lissa-batch", type=int, default=100)
    ap.add_argument("--lissa-scale", type=float, default=50.0)
    ap.add_argument("--arnoldi-iters", type=int, default=50)
    ap.add_argument("--methods", default="", help="only these (e.g. ekfac,tracin,trak-10); default: all")
    ap.add_argument("--skip", default="", help="LIBRARY:METHOD,... runs left out (cost), e.g. dattri:exact")
    ap.add_argument("--mislabel", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--mislabel-trak", type=int, default=10)
    ap.add_argument("--table", action="store_true", help="print RESULTS' markdown table from the CSVs in --out")
    ap.add_argument("--cached-only", action="store_true",
                    help="only methods whose scores an earlier (possibly parallel) run cached; the rest: times.csv rows")
    ap.add_argument("--append", action="store_true", help="keep the CSVs' rows of the other models")
    ap.add_argument("--tiny", action="store_true", help="seconds: 300 train points, 3 epochs, 8 subsets")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "dattri_protocol")
    ap.add_argument("--cache", type=Path, default=ROOT / "cache" / "dattri_protocol")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.out))
        return {}
    if args.tiny:
        args.n_train, args.epochs, args.subsets = 300, 2, 8
        args.queries_lr = args.queries_mlp = 20
        args.trak, args.tracin_models, args.ensemble, args.mislabel_trak = "2", 2, 2, 2
        args.cg_iters, args.lissa_depth, args.lissa_batch, args.arnoldi_iters = 3, 5, 20, 6
    args.damping = {"lr": args.damping_lr, "mlp": args.damping_mlp}
    torch.set_num_threads(1)
    torch.manual_seed(0)
    given = sys.argv[1:] if argv is None else argv
    cmd = "python experiments/dattri_protocol.py" + (" " + " ".join(given) if given else "")
    lds_rows, paired_rows, time_rows, infos = [], [], [], []
    for kind in args.models.split(","):
        subsets = args.subsets_mlp if kind == "mlp" and args.subsets_mlp else args.subsets
        notes = (f"mnist_5k 4,500/500 split (dattri: 5,000/500); {subsets} subsets x 1 model of 50% (dattri: 100); "
                 f"{args.queries_lr if kind == 'lr' else args.queries_mlp} test points scored; damping "
                 f"{args.damping[kind]}; one thread")
        a, b, c, extra = run_model(kind, args, args.cache, notes)
        lds_rows += a
        paired_rows += b
        time_rows += c
        infos.append(extra["info"])
    mis = mislabel(args, args.cache, "MLP, 10% flipped, self-influence") if args.mislabel and "mlp" in args.models \
        else []
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": cmd, "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": infos}
    try:
        from importlib.metadata import version
        meta["dattri"] = version("dattri")
    except Exception:  # noqa: BLE001
        pass
    models = args.models.split(",")

    def write(rows: list[dict], name: str) -> None:
        """This run's rows; with --append, the file's rows of other models are kept."""
        new = pd.DataFrame(rows)
        path = args.out / name
        if args.append and path.exists():
            old = pd.read_csv(path)
            new = pd.concat([old[~old["model"].isin(models)], new], ignore_index=True)
        new.to_csv(path, index=False)

    write(lds_rows, "lds.csv")
    write(paired_rows, "paired.csv")
    write(time_rows, "times.csv")
    if mis:
        write(mis, "mislabel.csv")
    runs = json.loads((args.out / "run.json").read_text()) if args.append and (args.out / "run.json").exists() else []
    runs = [r for r in (runs if isinstance(runs, list) else [runs]) if not set(r.get("models", [])) & set(models)]
    (args.out / "run.json").write_text(json.dumps(runs + [{**meta, "models": models}], indent=1) + "\n")
    return {"lds": lds_rows, "paired": paired_rows, "times": time_rows, "mislabel": mis, "meta": meta}


if __name__ == "__main__":
    main()

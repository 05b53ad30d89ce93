"""The paper's evaluation stages: mislabel detection, attribution grids, IHVP accuracy, LDS and LOO."""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from . import plots
from .errors import ConfigError, check
from .evaluation import detection_curve, detection_metrics
from .pipeline import Context, build, stage
from .scores import query_gradients
from .train import per_example_loss, progress


@stage("mislabel")
def mislabel_stage(ctx: Context) -> None:
    """Rank training points by self-influence; recall of flipped labels beside the loss, gradient-norm
    (identity) and random baselines (paper Fig. 3). Writes metrics, a figure and ``mislabel_curve.csv``."""
    flipped = ctx.train_data.flipped
    if not flipped.any():
        raise ConfigError("dataset.label_noise=0.0 is invalid for stage mislabel: it needs flipped labels; "
                          "set e.g. dataset.label_noise=0.1")
    rankings = {"self_influence": ctx.self_influence[0].numpy()}
    if ctx.solver.name != "identity":
        rankings["identity"] = ctx.baseline_self_influence("identity").numpy()
    rankings["loss"] = per_example_loss(ctx.model, ctx.train_data).numpy()
    rankings["random"] = np.random.default_rng(ctx.cfg.seed).random(len(flipped))
    metrics: dict[str, float] = {}
    for name, scores in rankings.items():
        metrics.update(detection_metrics(scores, flipped.numpy(), f"mislabel/{name}"))
    for di, d in enumerate(ctx.solver.dampings[1:], start=1):  # a damping list: every value from one pass
        metrics.update(detection_metrics(ctx.self_influence[di].numpy(), flipped.numpy(),
                                         f"mislabel/self_influence@{d}"))
    ctx.tracker.log(metrics)
    labels = {"self_influence": f"self-influence ({ctx.solver.name})", "identity": "gradient norm (identity)"}
    shown = {labels.get(k, k): v for k, v in rankings.items()}
    ctx.tracker.figure("mislabel_detection", plots.detection_curves(
        shown, flipped.numpy(), f"{ctx.dataset_spec.name}: {int(flipped.sum())} flipped of {len(flipped)}"))
    grid = np.linspace(0, 1, 201)
    cols = {name: np.interp(grid, *detection_curve(s, flipped.numpy())) for name, s in rankings.items()}
    ctx.tracker.table("mislabel_curve", ["fraction", *cols],
                      [[round(float(g), 4)] + [round(float(c[i]), 5) for c in cols.values()]
                       for i, g in enumerate(grid)], line_x="fraction")


@stage("attribution")
def attribution_stage(ctx: Context) -> None:
    """Grid of the most helpful / harmful training images for (up to) 3 query test images (paper Fig. 2)."""
    scores = ctx.pairwise[0]
    k = 3
    train, test = ctx.train_data, ctx.test_data
    names = train.classes
    helpful, harmful = [], []
    qpos = ctx.query_positions[:3]
    for i in range(len(qpos)):
        top = torch.argsort(scores[i], descending=True)
        rows = []
        for order in (top[:k], top.flip(0)[:k]):
            imgs = train.images(order)
            rows.append([(imgs[j], names[int(train.targets[t])] + (f" (true {names[int(train.clean_targets[t])]})" if train.flipped[t] else ""),
                          float(scores[i, t])) for j, t in enumerate(order.tolist())])
        helpful.append(rows[0])
        harmful.append(rows[1])
    qimgs = test.images(qpos)
    labels = [names[int(test.targets[p])] for p in qpos]
    fig = plots.attribution_grid(qimgs, labels, helpful, harmful, ctx.dataset_spec.mean, ctx.dataset_spec.std)
    ctx.tracker.figure("attribution", fig)


# -- IHVP accuracy (paper Sec. 6.2) ---------------------------------------------------------------------
@stage("ihvp")
def ihvp_stage(ctx: Context) -> None:
    """Relative error and cosine of the solver's IHVPs for the query gradients against a CG reference
    (exact damped GGN/Hessian products, tight tolerance), and wall time, per damping value."""
    solver = ctx.solver
    bad = [d for d in solver.dampings if d == "auto"]
    if bad:
        raise ConfigError("solver.damping=auto is invalid for stage ihvp: compare at explicit values, "
                          "e.g. solver.damping=[1e-4,1e-3,1e-2]")
    model = ctx.influence_model(solver)
    queries = ctx.test_data.subset(ctx.query_positions)
    grads = query_gradients(solver, model, queries, ctx.cfg.score.batch_size)
    ref_solver = ctx.fitted_solver(ctx.new_solver(_reference_node(ctx)))
    rows, metrics = [], {}
    for d in solver.dampings:
        ref = _reference_ihvp(ctx, ref_solver, grads, float(d))
        t0 = time.perf_counter()
        x = solver.precondition(grads, d)
        prec_s = time.perf_counter() - t0
        err = ((x - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)).mean().item()
        cos = torch.nn.functional.cosine_similarity(x.double(), ref.double(), dim=1).mean().item()
        total = solver.fit_seconds + prec_s
        rows.append([solver.name, float(d), err, cos, solver.fit_seconds, prec_s, total])
        metrics.update({f"ihvp/rel_error@{d:g}": err, f"ihvp/cosine@{d:g}": cos, f"ihvp/time_s@{d:g}": total})
    if len(rows) == 1:
        metrics.update({"ihvp/solver": solver.name, "ihvp/damping": rows[0][1], "ihvp/rel_error": rows[0][2],
                        "ihvp/cosine": rows[0][3], "ihvp/time_s": rows[0][6]})
    ctx.tracker.log(metrics)
    ctx.tracker.table("ihvp", ["solver", "damping", "rel_error", "cosine", "fit_s", "precondition_s", "time_s"], rows)


def _reference_node(ctx: Context):
    """The CG reference solver config: ``conf/solver/<ihvp.reference>.yaml`` + ``ihvp.reference_args``."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(Path(__file__).parent / "conf" / "solver" / f"{ctx.cfg.ihvp.reference}.yaml")
    node.seed = ctx.cfg.seed
    node.modules = ctx.cfg.solver.get("modules", "all")
    node.dtype = ctx.cfg.solver.get("dtype", "float32")
    if ctx.cfg.solver.get("curvature", "fisher") in ("fisher", "empirical_fisher", "hessian"):
        node.curvature = ctx.cfg.solver.get("curvature", "fisher")
    return OmegaConf.merge(node, ctx.cfg.ihvp.get("reference_args") or {})


def _reference_ihvp(ctx: Context, ref_solver, grads: torch.Tensor, damping: float) -> torch.Tensor:
    """Reference ``(G + λI)^-1 g`` for the query gradients, cached per (model, queries, damping)."""
    key = ctx.cache.key({"ref": ref_solver.fit_key, "cfg": ref_solver.fit_config(), "damping": damping,
                         "queries": ctx.query_positions.tolist(), "model": ctx.model_key})
    hit = ctx.cache.get("ihvp_reference", key)
    if hit is not None:
        return hit[0]["ihvp"].to(grads)
    ref = ref_solver.precondition(grads, damping)
    ctx.cache.put("ihvp_reference", key, {"ihvp": ref}, {"damping": damping})
    return ref


# -- Linear Datamodeling Score ------------------------------------------------------------------------------
def subset_masks(n: int, n_subsets: int, fraction: float, seed: int) -> torch.Tensor:
    """``[n_subsets, n]`` boolean masks, each keeping ``round(fraction * n)`` points (seeded)."""
    rng = np.random.default_rng(seed)
    k = int(round(fraction * n))
    masks = torch.zeros(n_subsets, n, dtype=torch.bool)
    for m in range(n_subsets):
        masks[m, torch.as_tensor(rng.choice(n, size=k, replace=False))] = True
    return masks


@torch.no_grad()
def query_measurements(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query loss and margin (correct logit minus the best other logit)."""
    out = model(x.to(next(model.parameters())))
    loss = torch.nn.functional.cross_entropy(out, y, reduction="none")
    correct = out.gather(1, y[:, None]).squeeze(1)
    other = out.scatter(1, y[:, None], float("-inf")).amax(1)
    return {"loss": loss.double().cpu(), "margin": (correct - other).double().cpu()}


def retrained_measurements(ctx: Context, positions: torch.Tensor, seed: int, x: torch.Tensor, y: torch.Tensor,
                           tag: str, warm: tuple[int, float] | None = None,
                           exclude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Train a fresh model (the run's model and trainer config, trainer seed ``seed``) on the training points
    at ``positions``, and measure the queries; cached per (model config, positions, seed, queries).
    ``warm=(epochs, lr_scale)`` instead continues training the run's trained model for that many epochs at
    that learning-rate scale (Koh & Liang's leave-one-out protocol). ``exclude`` (positions within
    ``positions``) leaves points out of training while keeping every other batch as in the full run."""
    key = ctx.cache.key({"model": ctx.model_config, "positions": _digest(positions), "seed": seed,
                         "queries": _digest(y) + _digest(x), "tag": tag,
                         **({"warm": list(warm), "from": ctx.model_key} if warm else {}),
                         **({"exclude": exclude.tolist()} if exclude is not None else {})})
    hit = ctx.cache.get("retrain", key)
    if hit is not None:
        return hit[0]
    trainer = dataclasses.replace(ctx.trainer, seed=seed)
    torch.manual_seed(seed)
    if warm:
        model = copy.deepcopy(ctx.model).train()
        trainer = dataclasses.replace(trainer, epochs=int(warm[0]), lr=trainer.lr * float(warm[1]))
    else:
        model = build(ctx.cfg.model)
    trainer.fit(model, ctx.train_data.subset(positions), exclude=exclude)
    out = query_measurements(model.eval(), x, y.to(next(model.parameters()).device))
    ctx.cache.put("retrain", key, out, {"n": len(positions), "seed": seed, "tag": tag})
    return out


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@stage("lds")
def lds_stage(ctx: Context) -> None:
    """LDS: Spearman, per query, between predicted (sum of scores over a subset) and actual retrained query
    loss/margin across random subsets; mean ± std and a bootstrap CI over queries. The ground truth is
    cached per subset and seed (resumable) and shared by every solver."""
    c = ctx.cfg.lds
    check(c.n_subsets >= 2, "lds.n_subsets", c.n_subsets, "must be >= 2")
    check(0 < c.fraction < 1, "lds.fraction", c.fraction, "must be in (0, 1)")
    check(c.seeds_per_subset >= 1, "lds.seeds_per_subset", c.seeds_per_subset, "must be >= 1")
    train, test = ctx.train_data, ctx.test_data
    qpos = ctx.query_positions
    qx, qy = test.images(qpos), test.targets[qpos]
    masks = subset_masks(len(train), c.n_subsets, c.fraction, c.subset_seed)
    truth = {"loss": torch.zeros(c.n_subsets, len(qpos), dtype=torch.float64),
             "margin": torch.zeros(c.n_subsets, len(qpos), dtype=torch.float64)}
    t0 = time.perf_counter()
    for m in progress(range(c.n_subsets), desc="lds subsets"):
        pos = masks[m].nonzero().squeeze(1)
        for s in range(c.seeds_per_subset):
            meas = retrained_measurements(ctx, pos, ctx.trainer.seed + 1 + s, qx, qy, "lds")
            for k in truth:
                truth[k][m] += meas[k] / c.seeds_per_subset
    truth_s = time.perf_counter() - t0
    scores = ctx.pairwise.double()  # [n_damping, n_query, n_train]
    metrics: dict = {"time/lds_truth_s": truth_s}
    for di, d in enumerate(ctx.solver.dampings):
        pred = scores[di] @ masks.double().T  # [n_query, n_subsets]: predicted helpfulness
        suffix = "" if di == 0 else f"@{d}"
        for meas, sign in (("loss", -1.0), ("margin", 1.0)):
            per_query = lds_per_query(pred, sign * truth[meas].T)
            stats = summarize(per_query, c.bootstrap, ctx.cfg.seed)
            name = "lds" if meas == "loss" else "lds_margin"
            metrics.update({f"{name}/{k}{suffix}": v for k, v in stats.items()})
    ctx.tracker.log(metrics)
    ctx.tracker.save_tensors("scores/lds_truth.safetensors", {"masks": masks, **truth,
                                                             "query_indices": test.indices[qpos]})


def lds_per_query(pred: torch.Tensor, actual: torch.Tensor) -> np.ndarray:
    """Spearman correlation per row of ``pred`` vs ``actual`` (``[n_query, n_subsets]``); NaN rows dropped."""
    with warnings.catch_warnings():  # a constant row has no rank correlation: dropped below
        warnings.simplefilter("ignore")
        out = [spearmanr(p, a).statistic for p, a in zip(pred.numpy(), actual.numpy(), strict=True)]
    return np.asarray([v for v in out if np.isfinite(v)], dtype=np.float64)


def summarize(values: np.ndarray, n_bootstrap: int, seed: int) -> dict[str, float]:
    """Mean, std and a 95% percentile-bootstrap interval of the mean (resampling queries)."""
    if len(values) == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    boots = rng.choice(values, size=(n_bootstrap, len(values)), replace=True).mean(1)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "ci_low": float(np.percentile(boots, 2.5)), "ci_high": float(np.percentile(boots, 97.5)),
            "n": len(values)}


# -- leave-one-out ---------------------------------------------------------------------------------------
@stage("loo")
def loo_stage(ctx: Context) -> None:
    """Actual vs predicted change of a query's loss when one of its most influential training points is
    removed and the model retrained (Koh & Liang style). Predicted = score / n. Every retraining, with or
    without a point, uses the same seed and the same batches (the point is dropped from its batch), so they
    differ only by that point. ``loo.retrain``: ``scratch`` (from initialisation) or ``warm`` (continue from
    the trained model for ``loo.warm_epochs``). Correlations are reported pooled over queries and within each
    query (the within-query one is not inflated by queries whose scores and losses are on different scales)."""
    c = ctx.cfg.loo
    check(c.retrain in ("scratch", "warm"), "loo.retrain", c.retrain, "use scratch or warm")
    check(c.n_queries <= len(ctx.query_positions), "loo.n_queries", c.n_queries,
          f"must be <= query.n ({len(ctx.query_positions)}); raise query.n")
    warm = (int(c.warm_epochs), float(c.warm_lr_scale)) if c.retrain == "warm" else None
    train, test = ctx.train_data, ctx.test_data
    n = len(train)
    scores = ctx.pairwise[0]
    everything = torch.arange(n)
    actual, predicted, query = [], [], []
    for qi in range(min(c.n_queries, len(ctx.query_positions))):
        qpos = ctx.query_positions[qi:qi + 1]
        qx, qy = test.images(qpos), test.targets[qpos]
        base = retrained_measurements(ctx, everything, ctx.trainer.seed, qx, qy, "loo", warm)["loss"][0]
        top = torch.argsort(scores[qi].abs(), descending=True)[: c.k]
        for t in top.tolist():
            loss = retrained_measurements(ctx, everything, ctx.trainer.seed, qx, qy, "loo", warm,
                                          exclude=torch.tensor([t]))["loss"][0]
            actual.append(float(loss - base))
            predicted.append(float(scores[qi, t]) / n)
            query.append(qi)
    a, p, q = np.asarray(actual), np.asarray(predicted), np.asarray(query)

    def corr(fn, x: np.ndarray, y: np.ndarray) -> float:
        return float(fn(x, y).statistic) if len(x) > 2 and np.ptp(x) > 0 and np.ptp(y) > 0 else float("nan")

    within = [(corr(pearsonr, p[q == i], a[q == i]), corr(spearmanr, p[q == i], a[q == i])) for i in np.unique(q)]
    metrics = {"loo/pearson": corr(pearsonr, p, a), "loo/spearman": corr(spearmanr, p, a),
               "loo/pearson_within": float(np.nanmean([w[0] for w in within])) if within else float("nan"),
               "loo/spearman_within": float(np.nanmean([w[1] for w in within])) if within else float("nan"),
               "loo/n_points": len(a)}
    ctx.tracker.log(metrics)
    ctx.tracker.table("loo", ["query", "predicted", "actual"], [[int(i), x, y] for i, x, y in zip(q, p, a, strict=True)])
    ctx.tracker.figure("loo", plots.loo_scatter(p, a, q, metrics))

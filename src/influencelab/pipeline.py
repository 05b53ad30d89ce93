"""Stages and the context they share. ``stages: [...]`` in the config selects which run, in order.

Each stage reads what it needs lazily from the context: asking for ``ctx.model`` trains the model or
loads it from the cache; ``ctx.solver`` fits the solver or loads its factors; so any stage can run on
its own and reuses whatever earlier runs already computed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import plots
from .cache import Cache
from .data.base import DatasetSpec, LabeledData
from .errors import ConfigError, InfluenceLabError, check
from .evaluation import detection_metrics
from .scores import pairwise_scores, precondition_queries, query_gradients, self_scores
from .solvers.base import Solver
from .tracking import Tracker
from .train import Trainer, evaluate, per_example_loss, resolve_device

log = logging.getLogger("influencelab")

STAGES: dict[str, Callable[[Context], None]] = {}


def stage(name: str):
    """Register a stage function under ``name`` (the value used in ``stages: [...]``)."""

    def deco(fn: Callable[[Context], None]) -> Callable[[Context], None]:
        STAGES[name] = fn
        return fn

    return deco


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our one-line errors through unwrapped."""
    try:
        return instantiate(node, **{"_convert_": "all", **kwargs})
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, InfluenceLabError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


class Context:
    """Validated config objects, the run directory, the cache and the lazily built artefacts."""

    def __init__(self, cfg: DictConfig, run_dir: Path, tracker: Tracker | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.cache = Cache(cfg.paths.cache)
        self.tracker = tracker or Tracker(backend="none")
        unknown = [s for s in cfg.stages if s not in STAGES]
        check(not unknown, "stages", list(cfg.stages), f"unknown {unknown}; available: {sorted(STAGES)}")
        # Validate everything at composition time, before any data is read or anything is written.
        self.dataset_spec: DatasetSpec = build(cfg.dataset)
        self.trainer: Trainer = build(cfg.trainer)
        self.device = resolve_device(self.trainer.device)
        self.initial_model = self.build_model()
        if any(s in cfg.stages for s in ("fit", "pairwise", "self", "mislabel", "attribution")):
            self.new_solver()

    # -- building blocks --------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        torch.manual_seed(self.trainer.seed)
        return build(self.cfg.model)

    def new_solver(self, node: Any = None) -> Solver:
        node = self.cfg.solver if node is None else node
        return build(node, device=str(self.device))

    @cached_property
    def data(self) -> tuple[LabeledData, LabeledData]:
        return self.dataset_spec.load()

    @property
    def train_data(self) -> LabeledData:
        return self.data[0]

    @property
    def test_data(self) -> LabeledData:
        return self.data[1]

    @cached_property
    def model_config(self) -> dict[str, Any]:
        """Exactly what the trained weights depend on."""
        return {"dataset": self.dataset_spec.cache_key(), "model": _plain(self.cfg.model),
                "trainer": self.trainer.cache_key()}

    @cached_property
    def model_key(self) -> str:
        return self.cache.key(self.model_config)

    @cached_property
    def model(self) -> nn.Module:
        """The trained model (eval mode), from the cache or trained now."""
        model = self.initial_model
        hit = self.cache.get("models", self.model_key)
        if hit is not None:
            tensors, info = hit
            model.load_state_dict(tensors)
            log.info("reusing cached model %s (trained in %.1fs)", self.model_key, info["train_s"])
            self.train_info = {**info, "cached": True}
        else:
            log.info("training %s on %s (%d points)", self.cfg.model._target_.rsplit(".", 1)[-1],
                     self.dataset_spec.name, len(self.train_data))
            t0 = time.perf_counter()
            history = self.trainer.fit(model, self.train_data, self.test_data)
            train_s = time.perf_counter() - t0
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.cache.put("models", self.model_key, state, self.model_config,
                           {"train_s": train_s, "history": history})
            self.train_info = {"train_s": train_s, "history": history, "cached": False}
        model.to(self.device).eval()
        return model

    # -- influence ----------------------------------------------------------------------------------
    @cached_property
    def solver(self) -> Solver:
        """The configured solver, fitted (or its factors loaded from the cache)."""
        return self.fitted_solver(self.new_solver())

    def influence_model(self, solver: Solver) -> nn.Module:
        return self.model.to(device=solver.device, dtype=solver.dtype)

    def fitted_solver(self, solver: Solver) -> Solver:
        model = self.influence_model(solver)
        solver.setup(model)
        fit_cfg = {"model": self.model_key, "solver": solver.fit_config()}
        key = self.cache.key(fit_cfg)
        hit = self.cache.get("factors", key)
        t0 = time.perf_counter()
        if hit is not None:
            solver.load_state_dict({k: v.to(solver.device) for k, v in hit[0].items()})
            log.info("reusing cached %s factors %s", solver.name, key)
        else:
            solver.fit(model, self.train_data)
            self.cache.put("factors", key, solver.state_dict(), fit_cfg)
        self.fit_key = key
        self.tracker.log({"time/fit_s": time.perf_counter() - t0})
        return solver

    @cached_property
    def query_positions(self) -> torch.Tensor:
        """Positions in the test set of the query points (``query.indices`` or ``query.n`` seeded)."""
        q = self.cfg.query
        n_test = len(self.test_data)
        if q.indices is not None:
            idx = [int(i) for i in q.indices]
            bad = [i for i in idx if not 0 <= i < n_test]
            check(not bad, "query.indices", bad, f"test indices must be in [0, {n_test})")
            return torch.tensor(idx)
        check(1 <= q.n, "query.n", q.n, "must be >= 1")
        g = torch.Generator().manual_seed(int(q.seed))
        return torch.randperm(n_test, generator=g)[: min(int(q.n), n_test)].sort().values

    def score_key(self, what: str, extra: Any = None) -> str:
        return self.cache.key({"what": what, "factors": self.fit_key, "dampings": self.solver.dampings,
                               "train": self.dataset_spec.cache_key(), "extra": extra})

    def save_scores(self, name: str, scores: torch.Tensor, extra: dict[str, torch.Tensor]) -> Path:
        """``scores/<name>.safetensors``: ``scores`` for the first damping (+ ``scores_by_damping``)."""
        tensors = {"scores": scores[0].contiguous(), "train_indices": self.train_data.indices, **extra}
        if scores.shape[0] > 1:
            tensors["scores_by_damping"] = scores
        meta = {"dampings": json.dumps(self.solver.dampings), "solver": self.solver.name}
        path = self.tracker.save_tensors(f"scores/{name}.safetensors", tensors, meta)
        self.tracker.artifact(f"{name}-scores", path)
        return path

    @cached_property
    def self_influence(self) -> torch.Tensor:
        """``[n_damping, n_train]`` self-influence with the configured solver."""
        solver = self.solver
        t0 = time.perf_counter()
        s = self_scores(solver, self.influence_model(solver), self.train_data, solver.dampings, self.cache,
                        self.score_key("self"), self.cfg.score.batch_size, self.cfg.score.chunk_size)
        self.tracker.log({"time/self_s": time.perf_counter() - t0})
        return s

    @cached_property
    def pairwise(self) -> torch.Tensor:
        """``[n_damping, n_query, n_train]`` pairwise scores for the query points."""
        solver = self.solver
        model = self.influence_model(solver)
        t0 = time.perf_counter()
        queries = self.test_data.subset(self.query_positions)
        grads = query_gradients(solver, model, queries, self.cfg.score.batch_size)
        pre = precondition_queries(solver, grads, solver.dampings)
        key = self.score_key("pairwise", self.query_positions.tolist())
        s = pairwise_scores(solver, model, self.train_data, pre, self.cache, key, self.cfg.score.batch_size,
                            self.cfg.score.chunk_size)
        self.tracker.log({"time/pairwise_s": time.perf_counter() - t0})
        return s.reshape(len(solver.dampings), len(queries), -1)


# -- stages ---------------------------------------------------------------------------------------------
@stage("train")
def train_stage(ctx: Context) -> None:
    """Train (or reuse) the model; log accuracy, loss, time and training curves."""
    model = ctx.model
    test = evaluate(model, ctx.test_data)
    train = evaluate(model, ctx.train_data)
    info = ctx.train_info
    ctx.tracker.log({"train/test_accuracy": test["accuracy"], "train/test_loss": test["loss"],
                     "train/train_accuracy": train["accuracy"], "train/train_loss": train["loss"],
                     "train/n_train": len(ctx.train_data), "train/n_flipped": int(ctx.train_data.flipped.sum()),
                     "train/cached": info["cached"], "time/train_s": info["train_s"]})
    ctx.tracker.save_tensors("model.safetensors", {k: v.detach().clone() for k, v in model.state_dict().items()},
                             {"model_key": ctx.model_key})
    ctx.tracker.figure("training", plots.training_curves(info["history"]))


@stage("fit")
def fit_stage(ctx: Context) -> None:
    """Fit the solver (curvature factors), or load them from the cache."""
    _ = ctx.solver


@stage("pairwise")
def pairwise_stage(ctx: Context) -> None:
    """Query x train influence scores -> ``scores/pairwise.safetensors``."""
    s = ctx.pairwise
    ctx.save_scores("pairwise", s, {"query_indices": ctx.test_data.indices[ctx.query_positions]})


@stage("self")
def self_stage(ctx: Context) -> None:
    """Self-influence of every training point -> ``scores/self.safetensors``."""
    ctx.save_scores("self", ctx.self_influence, {})


@stage("mislabel")
def mislabel_stage(ctx: Context) -> None:
    """Rank training points by self-influence; recall of flipped labels vs the loss and random baselines."""
    flipped = ctx.train_data.flipped
    if not flipped.any():
        raise ConfigError("stage mislabel needs flipped labels: dataset.label_noise=0.0 is invalid here; "
                          "set e.g. dataset.label_noise=0.1")
    rankings = {"self_influence": ctx.self_influence[0].numpy(),
                "loss": per_example_loss(ctx.model, ctx.train_data).numpy(),
                "random": np.random.default_rng(ctx.cfg.seed).random(len(flipped))}
    metrics: dict[str, float] = {}
    for name, scores in rankings.items():
        metrics.update(detection_metrics(scores, flipped.numpy(), f"mislabel/{name}"))
    ctx.tracker.log(metrics)
    labels = {f"self-influence ({ctx.solver.name})" if k == "self_influence" else k: v for k, v in rankings.items()}
    ctx.tracker.figure("mislabel_detection", plots.detection_curves(
        labels, flipped.numpy(), f"{ctx.dataset_spec.name}: {int(flipped.sum())} flipped of {len(flipped)}"))


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
            rows.append([(imgs[j], names[int(train.targets[t])] + (" (flipped)" if train.flipped[t] else ""),
                          float(scores[i, t])) for j, t in enumerate(order.tolist())])
        helpful.append(rows[0])
        harmful.append(rows[1])
    qimgs = test.images(qpos)
    labels = [names[int(test.targets[p])] for p in qpos]
    fig = plots.attribution_grid(qimgs, labels, helpful, harmful, ctx.dataset_spec.mean, ctx.dataset_spec.std)
    ctx.tracker.figure("attribution", fig)

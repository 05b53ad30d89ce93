"""Stages and the context they share. ``stages: [...]`` in the config selects which run, in order.

Each stage reads what it needs lazily from the context: asking for ``ctx.model`` trains the model or
loads it from the cache; ``ctx.solver`` fits the solver or loads its factors; so any stage can run on
its own and reuses whatever earlier runs already computed.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from . import distributed, plots
from .cache import Cache, Snapshots
from .data.base import DatasetSpec, LabeledData
from .errors import ConfigError, InfluenceLabError, SolverDivergedError, check
from .scores import pairwise_scores, parse_partition, precondition_queries, query_gradients, self_scores
from .solvers.base import Damping, Solver, parse_dampings
from .tracking import Tracker
from .train import Trainer, evaluate, resolve_device

log = logging.getLogger("influencelab")

STAGES: dict[str, Callable[[Context], None]] = {}


class PartitionDone(Exception):
    """Raised when a ``score.partition`` job has written its share: the remaining stages are skipped."""


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
        if isinstance(e.__cause__, TypeError) and "unexpected keyword argument" in str(e.__cause__):
            target = str(node.get("_target_", "?")).rsplit(".", 1)[-1]
            bad = str(e.__cause__).rsplit("argument", 1)[-1].strip(" '")
            raise ConfigError(f"{bad} is not a key of {target}; remove it (e.g. ~solver.{bad}) or pick a "
                              f"config that has it") from None
        raise


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


class Context:
    """Validated config objects, the run directory, the cache and the lazily built artefacts."""

    def __init__(self, cfg: DictConfig, run_dir: Path, tracker: Tracker | None = None,
                 sweep_dampings: Sequence[Any] | None = None):
        self.cfg = cfg
        self.sweep_dampings = list(sweep_dampings or [])
        self.run_dir = Path(run_dir)
        self.cache = Cache(cfg.paths.cache)
        self.tracker = tracker or Tracker(backend="none")
        self._model_copies: dict[tuple[str, torch.dtype], nn.Module] = {}
        unknown = [s for s in cfg.stages if s not in STAGES]
        check(not unknown, "stages", list(cfg.stages), f"unknown {unknown}; available: {sorted(STAGES)}")
        # Validate everything at composition time, before any data is read or anything is written.
        self.dataset_spec: DatasetSpec = build(cfg.dataset)
        if "mislabel" in cfg.stages and not self.dataset_spec.label_noise > 0:
            raise ConfigError(f"dataset.label_noise={self.dataset_spec.label_noise} is invalid for stage mislabel: "
                              f"it needs flipped labels; set e.g. dataset.label_noise=0.1")
        every = OmegaConf.select(cfg, "fit.checkpoint_s", default=30.0)
        check(isinstance(every, (int, float)) and every >= 0, "fit.checkpoint_s", every,
              "must be a number of seconds >= 0 (0 = snapshot after every batch)")
        self.trainer: Trainer = build(cfg.trainer)
        self.ensemble = OmegaConf.select(cfg, "score.ensemble", default=1)
        check(isinstance(self.ensemble, int) and self.ensemble >= 1, "score.ensemble", self.ensemble,
              "must be an integer >= 1 (number of independently trained models whose scores are averaged)")
        self.device = resolve_device(self.trainer.device)
        self.initial_model = self.build_model()
        if any(s != "train" for s in cfg.stages):
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
        if not distributed.is_main():
            distributed.barrier()  # under torchrun, rank 0 trains (or finds) the model and caches it first
        hit = self.cache.get("models", self.model_key)
        if hit is not None:
            tensors, info = hit
            model.load_state_dict(tensors)
            log.info("reusing cached model %s (trained in %.1fs)", self.model_key, info["train_s"])
            self.train_info = {**info, "cached": True}
        else:
            self._train_and_cache(model)
        if distributed.is_main():
            distributed.barrier()
        model.to(self.device).eval()
        return model

    def _train_and_cache(self, model: nn.Module) -> None:
        log.info("training %s on %s (%d points)", self.cfg.model._target_.rsplit(".", 1)[-1],
                 self.dataset_spec.name, len(self.train_data))
        t0 = time.perf_counter()
        history = self.trainer.fit(model, self.train_data, self.test_data)
        train_s = time.perf_counter() - t0
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.cache.put("models", self.model_key, state, self.model_config, {"train_s": train_s, "history": history})
        self.train_info = {"train_s": train_s, "history": history, "cached": False}

    # -- influence ----------------------------------------------------------------------------------
    @cached_property
    def solver(self) -> Solver:
        """The configured solver, fitted (or its factors loaded from the cache)."""
        t0 = time.perf_counter()
        solver = self.fitted_solver(self.new_solver())
        self.tracker.log({"time/fit_s": time.perf_counter() - t0})
        return solver

    def influence_model(self, solver: Solver) -> nn.Module:
        """The trained model on the solver's device and dtype (a copy when they differ; eval mode)."""
        p = next(self.model.parameters())
        if p.device == solver.device and p.dtype == solver.dtype:
            return self.model
        key = (str(solver.device), solver.dtype)
        if key not in self._model_copies:
            self._model_copies[key] = copy.deepcopy(self.model).to(device=solver.device, dtype=solver.dtype).eval()
        return self._model_copies[key]

    def fitted_solver(self, solver: Solver) -> Solver:
        """Set up and fit ``solver`` on the trained model, or load its cached state; ``solver.fit_key`` names it."""
        model = self.influence_model(solver)
        solver.setup(model)
        fit_cfg = {"model": self.model_key, "solver": solver.fit_config()}
        key = self.cache.key(fit_cfg)
        hit = self.cache.get("factors", key)
        if hit is not None:
            solver.load_state_dict({k: v.to(solver.device) for k, v in hit[0].items()})
            solver.bind(model, self.train_data)
            solver.fit_seconds = float(hit[1].get("fit_s", 0.0))
            log.info("reusing cached %s factors %s (fitted in %.1fs)", solver.name, key, solver.fit_seconds)
        else:
            t0 = time.perf_counter()
            every = OmegaConf.select(self.cfg, "fit.checkpoint_s", default=30.0)
            solver._snapshots = Snapshots(self.cache, f"{key}-r{distributed.rank()}of{distributed.world_size()}",
                                          every)
            with distributed.collective():
                solver.fit(model, self.train_data)
            solver.fit_seconds = time.perf_counter() - t0
            if distributed.is_main():
                self.cache.put("factors", key, solver.state_dict(), fit_cfg, {"fit_s": solver.fit_seconds})
            distributed.barrier()
            solver._snapshots.clear()
            solver._snapshots = None
        solver.fit_key = key
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

    def score_key(self, solver: Solver, what: str, extra: Any = None,
                  dampings: Sequence[Damping] | None = None) -> str:
        """Cache key of a score computation: the fitted solver, the dampings scored, the data and the queries."""
        return self.cache.key({"what": what, "factors": solver.fit_key,
                               "dampings": list(solver.dampings if dampings is None else dampings),
                               "train": self.dataset_spec.cache_key(), "extra": extra})

    @cached_property
    def score_dampings(self) -> list[Damping]:
        """The dampings scored in one pass: the solver's own, then, when this job is one of a multirun that sweeps
        ``solver.damping`` (``-m solver.damping=1e-4,1e-3,...``), the sweep's other values. The sweep's first job
        then scores every value for the price of about one (as a damping list does) and caches them under a key
        the whole sweep shares, so the other jobs read their scores from the cache instead of repeating the
        pass. Only for solvers whose fit does not depend on the damping."""
        own = list(self.solver.dampings)
        if not self.solver.damping_free_fit:
            return own
        swept: list[Damping] = []  # in the sweep's order, the same for every job: one shared cache key
        for value in self.sweep_dampings:
            try:
                swept += [d for d in parse_dampings(value) if d not in swept]
            except ConfigError:  # another job's bad value is that job's error
                continue
        out = swept + [d for d in own if d not in swept]
        if out == own:
            return own
        if distributed.is_main():
            log.info("multirun over solver.damping: scoring all of %s in one pass (cached for the sweep)", out)
        return out

    def _for_own_dampings(self, compute: Callable[[list[Damping]], torch.Tensor]) -> torch.Tensor:
        """``compute(dampings)`` (scores ``[n_damping, ...]``) for :attr:`score_dampings`, then the rows of the
        solver's own dampings. Should another job's damping make the shared pass diverge (e.g. LiSSA at a very
        large λ), this job's own dampings are scored alone, and that other job reports its error itself."""
        own, dampings = list(self.solver.dampings), self.score_dampings
        if dampings == own:
            return compute(own)
        try:
            scores = compute(dampings)
        except SolverDivergedError as e:
            log.warning("the sweep's shared pass over %s failed (%s); scoring %s alone", dampings, e, own)
            return compute(own)
        return scores[[dampings.index(d) for d in own]]

    def save_scores(self, name: str, scores: torch.Tensor, extra: dict[str, torch.Tensor]) -> Path:
        """``scores/<name>.safetensors``: ``scores`` for the first damping (+ ``scores_by_damping``)."""
        tensors = {"scores": scores[0].clone(), "train_indices": self.train_data.indices, **extra}
        if scores.shape[0] > 1:
            tensors["scores_by_damping"] = scores
        meta = {"dampings": json.dumps(self.solver.dampings), "solver": self.solver.name,
                "ensemble": str(self.ensemble)}
        path = self.tracker.save_tensors(f"scores/{name}.safetensors", tensors, meta)
        self.tracker.artifact(f"{name}-scores", path)
        return path

    @cached_property
    def self_influence(self) -> torch.Tensor:
        """``[n_damping, n_train]`` self-influence with the configured solver (averaged over the ensemble)."""
        return self._timed_ensemble_mean("self", Context._own_self_influence)

    def _timed_ensemble_mean(self, what: str, scores: Callable[[Context], torch.Tensor]) -> torch.Tensor:
        """``scores(ctx)`` of this run, averaged with its ensemble members'; logs ``time/<what>_s`` (all of it)."""
        t0 = time.perf_counter()
        s = scores(self)
        if self.members:
            s = torch.stack([s, *(scores(m) for m in self.members)]).mean(0)
        self.tracker.log({f"time/{what}_s": time.perf_counter() - t0})
        return s

    def _own_self_influence(self) -> torch.Tensor:
        solver = self.solver

        def compute(dampings: list[Damping]) -> torch.Tensor:
            s = self_scores(solver, self.influence_model(solver), self.train_data, dampings, self.cache,
                            self.score_key(solver, "self", dampings=dampings), self.cfg.score.batch_size,
                            self.cfg.score.chunk_size, self.partition)
            return self._complete(s, "self")

        return self._for_own_dampings(compute)

    def baseline_self_influence(self, solver_name: str) -> torch.Tensor:
        """Self-influence ``[n_train]`` with another solver (e.g. ``identity`` = squared gradient norm)."""
        node = OmegaConf.load(Path(__file__).parent / "conf" / "solver" / f"{solver_name}.yaml")
        node.seed = self.cfg.seed
        node.modules = self.cfg.solver.get("modules", "all")
        solver = self.fitted_solver(self.new_solver(node))
        return self_scores(solver, self.influence_model(solver), self.train_data, solver.dampings[:1], self.cache,
                           self.score_key(solver, "self"), self.cfg.score.batch_size, self.cfg.score.chunk_size)[0]

    @cached_property
    def pairwise(self) -> torch.Tensor:
        """``[n_damping, n_query, n_train]`` pairwise scores for the query points (averaged over the ensemble)."""
        return self._timed_ensemble_mean("pairwise", Context._own_pairwise)

    def _own_pairwise(self) -> torch.Tensor:
        solver = self.solver
        model = self.influence_model(solver)
        queries = self.test_data.subset(self.query_positions)
        grads = query_gradients(solver, model, queries, self.cfg.score.batch_size)

        def compute(dampings: list[Damping]) -> torch.Tensor:
            pre = precondition_queries(solver, grads, dampings)
            key = self.score_key(solver, "pairwise", [self.query_positions.tolist(),
                                                      self.cfg.score.get("query_rank")], dampings)
            s = pairwise_scores(solver, model, self.train_data, pre, self.cache, key, self.cfg.score.batch_size,
                                self.cfg.score.chunk_size, self.partition, self.cfg.score.get("query_rank"))
            return self._complete(s, "pairwise").reshape(len(dampings), len(queries), -1)

        return self._for_own_dampings(compute)

    @cached_property
    def members(self) -> list[Context]:
        """The other models of a ``score.ensemble`` of k: the same config with ``trainer.seed + 1000·i``
        (i = 1..k-1), each trained, fitted and scored (and cached) like the run's own model. Averaging scores
        over independently trained models averages out the training noise a single model's scores carry
        (as TRAK does; measured in experiments/RESULTS.md section 4)."""
        out = []
        for i in range(1, self.ensemble):
            cfg = copy.deepcopy(self.cfg)
            with open_dict(cfg):
                cfg.trainer.seed = int(self.trainer.seed) + 1000 * i
                cfg.score.ensemble = 1
            log.info("ensemble member %d/%d: trainer.seed=%d", i + 1, self.ensemble, cfg.trainer.seed)
            member = Context(cfg, self.run_dir, sweep_dampings=self.sweep_dampings)
            member.__dict__["data"] = self.data  # same dataset config: share the loaded data
            _ = member.model
            out.append(member)
        return out

    @cached_property
    def partition(self) -> tuple[int, int]:
        return parse_partition(self.cfg.score.get("partition"))

    def _complete(self, scores: torch.Tensor | None, what: str) -> torch.Tensor:
        """Scores of a partition job are only cached; stop the job there (other partitions still to run)."""
        if scores is None:
            i, k = self.partition
            self.tracker.log({f"score/{what}_partition": f"{i}/{k}"})
            raise PartitionDone(f"partition {i}/{k} of the {what} scores is cached; run the other partitions, "
                                f"then the same command without score.partition to merge them")
        return scores


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
    history = {k: v for k, v in info["history"].items() if v}  # per epoch: loss, train (and test) accuracy
    ctx.tracker.table("training_curve", ["epoch", *history],
                      [[e + 1, *(round(float(v[e]), 5) for v in history.values())]
                       for e in range(len(history["loss"]))], line_x="epoch")


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


# the paper's evaluation stages register themselves on import
from . import studies, unlearn  # noqa: E402,F401

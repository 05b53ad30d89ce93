"""The run's control flow: :class:`Context` holds the validated config objects and hands the stages what they
ask for, lazily (asking for ``ctx.model`` trains the model or loads it from the cache; ``ctx.attributor`` fits
the solver or loads its factors), so any stage can run on its own and reuses what earlier runs computed.

The flow: config -> data/model (:mod:`.data`, :mod:`.models`) -> train (:mod:`.train`) -> solver
(:mod:`.solvers`, through the Python API :class:`~influencelab.api.Attributor`) -> scores (:mod:`.scores`) ->
evaluations (:mod:`.stages`) -> report (:mod:`.report`). Cached artefacts live in :mod:`.artifacts`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from . import distributed
from .api import Attributor
from .artifacts import Artifacts
from .compose import build, plain, solver_node
from .data.base import DatasetSpec, LabeledData
from .errors import ConfigError, SolverDivergedError, check
from .schema import validate
from .scores import parse_partition
from .solvers.base import (
    Convergence,
    Damping,
    Solver,
    damping_label,
    diagnostics_json,
    merge_diagnostics,
    parse_dampings,
)
from .stages.registry import STAGES
from .tracking import Tracker
from .train import Trainer, resolve_device

log = logging.getLogger("influencelab")


class Context:
    """Validated config objects, the run directory, the artefacts and the lazily built model and attributor."""

    def __init__(self, cfg: DictConfig, run_dir: Path, tracker: Tracker | None = None,
                 sweep_dampings: Sequence[Any] | None = None):
        self.cfg = cfg
        self.sweep_dampings = list(sweep_dampings or [])
        self.run_dir = Path(run_dir)
        self.tracker = tracker or Tracker(backend="none")
        unknown = [s for s in cfg.stages if s not in STAGES]
        check(not unknown, "stages", list(cfg.stages), f"unknown {unknown}; available: {sorted(STAGES)}")
        # Validate everything the selected stages will use, before any data is read or anything is written.
        self.sections = validate(cfg, list(cfg.stages))
        self.query, self.score, self.fit_cfg = self.sections["query"], self.sections["score"], self.sections["fit"]
        self.dataset_spec: DatasetSpec = build(cfg.dataset)
        self.trainer: Trainer = build(cfg.trainer)
        self.device = resolve_device(self.trainer.device)
        self.partition = parse_partition(self.score.partition)
        self.artifacts = Artifacts(cfg.paths.cache, self.fit_cfg.checkpoint_s)
        self.initial_model = self.build_model()
        self.uses_solver = any(s != "train" for s in cfg.stages)
        if self.uses_solver:
            self.new_solver()
        for s in cfg.stages:
            if STAGES[s].precheck is not None:
                STAGES[s].precheck(self)
        #: set when a ``score.partition`` job has cached its share: the remaining stages are skipped
        self.partition_pending = False
        #: per score pass (``pairwise``, ``self``): the iterative solver's convergence per damping (worst over
        #: the ensemble's models); ``{}`` for direct solvers. Logged as ``solver/*@<damping>``, and saved with
        #: the scores (:meth:`save_scores`)
        self.convergence: dict[str, dict[Damping, Convergence]] = {}

    def section(self, name: str) -> Any:
        """The typed object of config section ``name`` (``lds``, ``unlearn``, ...)."""
        return self.sections[name]

    # -- building blocks --------------------------------------------------------------------------
    def build_model(self, seed: int | None = None) -> nn.Module:
        torch.manual_seed(self.trainer.seed if seed is None else seed)
        return build(self.cfg.model)

    def new_solver(self, node: Any = None) -> Solver:
        return build(self.cfg.solver if node is None else node, device=str(self.device))

    def solver_node(self, name: str, **keys: Any) -> DictConfig:
        """The ``solver`` group's ``name`` config (Hydra-composed) with the run's seed and shared keys."""
        shared = {k: self.cfg.solver[k] for k in ("modules", "dtype") if k in self.cfg.solver}
        return solver_node(name, {**shared, **keys}, seed=int(self.cfg.seed))

    @cached_property
    def data(self) -> tuple[LabeledData, LabeledData]:
        return self.dataset_spec.load()

    @property
    def train_data(self) -> LabeledData:
        return self.data[0]

    @property
    def test_data(self) -> LabeledData:
        return self.data[1]

    def model_config(self, trainer: Trainer | None = None) -> dict[str, Any]:
        """Exactly what the trained weights depend on."""
        return {"dataset": self.dataset_spec.cache_key(), "model": plain(self.cfg.model),
                "trainer": (trainer or self.trainer).cache_key()}

    @cached_property
    def model_key(self) -> str:
        return self.artifacts.key(self.model_config())

    def trained(self, trainer: Trainer, model: nn.Module | None = None) -> tuple[nn.Module, str, dict[str, Any]]:
        """A model trained by ``trainer`` on the run's data (from the cache or trained now): model, key, info."""
        config = self.model_config(trainer)
        key = self.artifacts.key(config)
        model = model if model is not None else self.build_model(trainer.seed)

        def train(m: nn.Module) -> dict:
            log.info("training %s on %s (%d points)", self.cfg.model._target_.rsplit(".", 1)[-1],
                     self.dataset_spec.name, len(self.train_data))
            return trainer.fit(m, self.train_data, self.test_data)

        info = self.artifacts.model(model, key, config, train)
        return model.to(self.device).eval(), key, info

    @cached_property
    def _trained(self) -> tuple[nn.Module, str, dict[str, Any]]:
        return self.trained(self.trainer, self.initial_model)

    @property
    def model(self) -> nn.Module:
        """The trained model (eval mode), from the cache or trained now."""
        return self._trained[0]

    @property
    def train_info(self) -> dict[str, Any]:
        return self._trained[2]

    # -- influence (through the Python API) ------------------------------------------------------------
    def attributor_for(self, model: nn.Module, model_key: str, solver: Solver | None = None) -> Attributor:
        """An :class:`Attributor` of ``model`` with the configured solver (or ``solver``), fitted on the training
        data with the run's cache and keys."""
        attr = Attributor(model, solver=solver or self.new_solver(), cache_dir=self.artifacts,
                          score_batch_size=self.score.batch_size, chunk_size=self.score.chunk_size, model_key=model_key)
        return attr.fit(self.train_data, data_key=self.dataset_spec.cache_key())

    @cached_property
    def attributor(self) -> Attributor:
        """The configured solver on the trained model, fitted (or its factors loaded from the cache)."""
        t0 = time.perf_counter()
        attr = self.attributor_for(self.model, self.model_key)
        # time/fit_s: this run's wall time (loading, when cached); fit/compute_s: what computing the fit took
        self.tracker.log({"time/fit_s": time.perf_counter() - t0, "fit/cached": attr.fit_info.cached,
                          "fit/compute_s": attr.fit_seconds})
        return attr

    @property
    def solver(self) -> Solver:
        return self.attributor.solver

    def influence_model(self) -> nn.Module:
        """The trained model on the configured solver's device and dtype (eval mode)."""
        return self.attributor.model

    @cached_property
    def members(self) -> list[Attributor]:
        """The other models of a ``score.ensemble`` of k: the run's config with ``trainer.seed + 1000·i``
        (i = 1..k-1), each trained, fitted and scored (and cached) like the run's own model. Averaging scores
        over independently trained models averages out the training noise a single model's scores carry
        (as TRAK does; measured in experiments/RESULTS.md section 4)."""
        out = []
        for i in range(1, self.score.ensemble):
            trainer = dataclasses.replace(self.trainer, seed=int(self.trainer.seed) + 1000 * i)
            log.info("ensemble member %d/%d: trainer.seed=%d", i + 1, self.score.ensemble, trainer.seed)
            model, key, _ = self.trained(trainer)
            out.append(self.attributor_for(model, key))
        return out

    @cached_property
    def query_positions(self) -> torch.Tensor:
        """Positions in the test set of the query points (``query.indices`` or ``query.n`` seeded)."""
        n_test = len(self.test_data)
        if self.query.indices is not None:
            idx = [int(i) for i in self.query.indices]
            bad = [i for i in idx if not 0 <= i < n_test]
            check(not bad, "query.indices", bad, f"test indices must be in [0, {n_test})")
            return torch.tensor(idx)
        g = torch.Generator().manual_seed(int(self.query.seed))
        return torch.randperm(n_test, generator=g)[: min(int(self.query.n), n_test)].sort().values

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

    def _for_own_dampings(self, compute: Callable[[list[Damping]], torch.Tensor | None]) -> torch.Tensor | None:
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
        return None if scores is None else scores[[dampings.index(d) for d in own]]

    def _ensemble_mean(self, what: str, scores: Callable[[Attributor], torch.Tensor | None]) -> torch.Tensor | None:
        """``scores(attributor)`` for the run's model, averaged with its ensemble members'; logs
        ``time/<what>_s`` (all of it). ``None`` while a partition job's share is all that is cached."""
        t0 = time.perf_counter()
        parts = [self._for_own_dampings(lambda d, a=a: scores(a, d)) for a in [self.attributor, *self.members]]
        if any(p is None for p in parts):
            i, k = self.partition
            self.tracker.log({f"score/{what}_partition": f"{i}/{k}"})
            log.info("partition %d/%d of the %s scores is cached; run the other partitions, then the same command "
                     "without score.partition to merge them", i, k, what)
            self.partition_pending = True
            return None
        s = parts[0] if len(parts) == 1 else torch.stack(parts).mean(0)
        self.tracker.log({f"time/{what}_s": time.perf_counter() - t0})
        own = list(self.solver.dampings)
        self.report_convergence(what, merge_diagnostics(*({d: c for d, c in a.diagnostics.items() if d in own}
                                                           for a in [self.attributor, *self.members])))
        return s

    def report_convergence(self, what: str, record: dict[Damping, Convergence]) -> None:
        """Keep ``what``'s convergence record; log ``solver/{rel_residual_max,rel_residual_mean,iterations,
        converged,solve_s}@<damping>`` (and LiSSA's ``solver/scale@``), the worst over the run's score passes so far
        (``solve_s``: their summed solve time), and warn for each unconverged damping, with the fix."""
        self.convergence[what] = record
        if not record:
            return
        metrics: dict[str, Any] = {}
        for d, c in merge_diagnostics(*self.convergence.values()).items():
            lab = damping_label(d)
            metrics.update({f"solver/rel_residual_max@{lab}": c.rel_residual_max,
                            f"solver/rel_residual_mean@{lab}": c.rel_residual_mean,
                            f"solver/iterations@{lab}": c.iterations, f"solver/converged@{lab}": c.converged,
                            f"solver/solve_s@{lab}": c.solve_s})
            if c.scale is not None:
                metrics[f"solver/scale@{lab}"] = c.scale
        self.tracker.log(metrics)
        key = self.solver.iteration_key
        fix = f"raise solver.{key} (now {getattr(self.solver, key)}) or solver.damping" if key else \
            "raise solver.damping"
        for d, c in record.items():
            if not c.converged and distributed.is_main():
                log.warning("the %s scores at solver.damping=%s are UNCONVERGED: %s's worst relative residual "
                            "||(G + λI) x - v|| / ||v|| is %.3g > %g (%d iterations; measured on %s); %s",
                            what, damping_label(d), self.solver.label, c.rel_residual_max, c.tol, c.iterations,
                            c.residual_on, fix)

    @cached_property
    def self_influence(self) -> torch.Tensor | None:
        """``[n_damping, n_train]`` self-influence with the configured solver (averaged over the ensemble)."""
        return self._ensemble_mean("self", lambda a, d: a.self_influence(dampings=d, partition=self.partition))

    @cached_property
    def pairwise(self) -> torch.Tensor | None:
        """``[n_damping, n_query, n_train]`` pairwise scores for the query points (averaged over the ensemble)."""
        queries = self.test_data.subset(self.query_positions)
        return self._ensemble_mean("pairwise", lambda a, d: a.pairwise(
            queries, dampings=d, query_key=self.query_positions.tolist(), query_rank=self.score.query_rank,
            partition=self.partition))

    def baseline_self_influence(self, solver_name: str) -> torch.Tensor:
        """Self-influence ``[n_train]`` with another solver of the ``solver`` group (e.g. ``identity``)."""
        attr = self.attributor_for(self.model, self.model_key, self.new_solver(self.solver_node(solver_name)))
        return attr.self_influence(dampings=attr.dampings[:1])[0]

    def save_scores(self, name: str, scores: torch.Tensor, extra: dict[str, torch.Tensor]) -> Path:
        """``scores/<name>.safetensors``: ``scores`` for the first damping (+ ``scores_by_damping``); metadata:
        ``dampings``, ``solver``, ``ensemble`` and ``convergence`` (JSON: per damping label, the fields of
        :class:`~influencelab.solvers.base.Convergence`; ``{}`` for direct solvers)."""
        tensors = {"scores": scores[0].clone(), "train_indices": self.train_data.indices, **extra}
        if scores.shape[0] > 1:
            tensors["scores_by_damping"] = scores
        meta = {"dampings": json.dumps(self.solver.dampings), "solver": self.solver.label,
                "ensemble": str(self.score.ensemble),
                # per damping: how converged an iterative solver's scores are ({} for direct solvers)
                "convergence": json.dumps(diagnostics_json(self.convergence.get(name, {})))}
        path = self.tracker.save_tensors(f"scores/{name}.safetensors", tensors, meta)
        self.tracker.artifact(f"{name}-scores", path)
        return path

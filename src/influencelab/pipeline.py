"""The run's control flow: :class:`Context` holds the validated config objects and hands the stages what they
ask for, lazily (asking for ``ctx.model`` trains the model or loads it from the cache; ``ctx.attributor`` fits
the solver or loads its factors), so any stage can run on its own and reuses what earlier runs computed.

The flow: config -> data/model (:mod:`.data`, :mod:`.models`) -> train (:mod:`.train`) -> solver
(:mod:`.solvers`, through the Python API :class:`~influencelab.api.Attributor`) -> scores (:mod:`.scores`) ->
evaluations (:mod:`.stages`) -> report (:mod:`.report`). Cached artefacts live in :mod:`.artifacts`.

The Context builds; the engine scores. Ensembles (``score.ensemble``), partitions (``score.partition``), the
sharing of a damping sweep's pass and convergence reporting are the Attributor's (:mod:`.engine`): the Context
trains the ensemble's models and hands them over, and keeps the CLI's glue (timings and convergence metrics to the
tracker, score files).
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
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from .api import Attributor
from .artifacts import Artifacts
from .compose import build, plain, solver_node
from .data.base import DatasetSpec, LabeledData
from .engine import CLI_NAMES
from .errors import ConfigError, check
from .registry import STAGES
from .schema import validate
from .scores import parse_partition
from .solvers.base import Damping, Solver, diagnostics_json, parse_dampings
from .tasks import Task, resolve_task, task_key
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
        self.task: Task = resolve_task(build(cfg.task) if cfg.get("task") is not None else None)
        self.dataset_spec.check_task(self.task)  # (classes vs continuous targets, label noise)
        self.trainer: Trainer = build(cfg.trainer)
        self.device = resolve_device(self.trainer.device)
        self.partition = parse_partition(self.score.partition)
        self.artifacts = Artifacts(cfg.paths.cache, self.fit_cfg.checkpoint_s)
        self.initial_model = self.build_model()
        self.uses_solver = any(s != "train" for s in cfg.stages)
        if self.uses_solver:  # its modules resolved on the built model: a bad pattern is found before training
            self.new_solver().setup(self.initial_model)
        for s in cfg.stages:
            if STAGES[s].precheck is not None:
                STAGES[s].precheck(self)
        #: set when a ``score.partition`` job has cached its share: the remaining stages are skipped
        self.partition_pending = False

    def section(self, name: str) -> Any:
        """The typed object of config section ``name`` (``lds``, ``unlearn``, ...)."""
        return self.sections[name]

    # -- building blocks --------------------------------------------------------------------------
    def build_model(self, seed: int | None = None) -> nn.Module:
        torch.manual_seed(self.trainer.seed if seed is None else seed)
        return build(self.cfg.model)

    def new_solver(self, node: Any = None) -> Solver:
        return build(self.cfg.solver if node is None else node, device=str(self.device), task=self.task)

    def use_solver(self, **keys: Any) -> None:
        """Set keys of the configured solver (e.g. the ``damping`` and ``modules`` the ``select`` stage chose) for
        the stages that follow: ``cfg.solver`` gets them (checked by building the solver), and the attributor and
        scores of the previous solver are dropped, so the next stage fits (or loads) and scores with the new one."""
        node = OmegaConf.merge(OmegaConf.create(plain(self.cfg.solver)), keys)
        self.new_solver(node)
        with open_dict(self.cfg):
            self.cfg.solver = node
        for name in ("attributor", "self_influence", "pairwise"):  # cached with the previous solver
            self.__dict__.pop(name, None)

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
                "trainer": (trainer or self.trainer).cache_key(), **task_key(self.task)}

    def model_entry_config(self, trainer: Trainer | None = None) -> dict[str, Any]:
        """The cached model entry's key: :meth:`model_config`, plus ``trainer.checkpoints`` when the entry also holds
        training checkpoints (solver=tracin); retraining keys keep :meth:`model_config` (the weights are the same)."""
        n = (trainer or self.trainer).checkpoints
        return {**self.model_config(trainer), **({"checkpoints": n} if n else {})}

    @cached_property
    def model_key(self) -> str:
        return self.artifacts.key(self.model_entry_config())

    def trained(self, trainer: Trainer, model: nn.Module | None = None) -> tuple[nn.Module, str, dict[str, Any]]:
        """A model trained by ``trainer`` on the run's data (from the cache or trained now): model, key, info."""
        config = self.model_entry_config(trainer)
        key = self.artifacts.key(config)
        model = model if model is not None else self.build_model(trainer.seed)

        def train(m: nn.Module) -> dict:
            log.info("training %s on %s (%d points)", self.cfg.model._target_.rsplit(".", 1)[-1],
                     self.dataset_spec.name, len(self.train_data))
            return trainer.fit(m, self.train_data, self.test_data, task=self.task)

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

    # -- influence (the engine: the Python API's Attributor) ----------------------------------------------------
    def attributor_for(self, model: nn.Module, model_key: str, solver: Solver | None = None,
                       **engine: Any) -> Attributor:
        """An :class:`Attributor` of ``model`` with the configured solver (or ``solver``), fitted on the training
        data with the run's cache and keys; ``engine``: more of its arguments."""
        attr = Attributor(model, task=self.task, solver=solver or self.new_solver(), cache_dir=self.artifacts,
                          score_batch_size=self.score.batch_size, chunk_size=self.score.chunk_size,
                          memory_gb=self.score.memory_gb, model_key=model_key, setting_names=CLI_NAMES, **engine)
        return attr.fit(self.train_data, data_key=self.dataset_spec.cache_key())

    @cached_property
    def attributor(self) -> Attributor:
        """The configured solver on the trained model, fitted (or its factors loaded from the cache); its scoring
        passes share the multirun's dampings (:attr:`swept_dampings`) and log their convergence metrics
        (``solver/*@<damping>``) to the tracker. A ``score.ensemble`` adds its other models when scores are
        first asked for (:meth:`ensemble`)."""
        t0 = time.perf_counter()
        attr = self.attributor_for(self.model, self.model_key, shared_dampings=self.swept_dampings,
                                   on_metrics=lambda m: self.tracker.log(m))
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

    def ensemble(self) -> Attributor:
        """:attr:`attributor` with the other models of a ``score.ensemble`` of k added (once): the run's config
        with ``trainer.seed + 1000·i`` (i = 1..k-1), each trained and fitted (and cached, under its own model key)
        like the run's own model; the engine averages their scores. Averaging scores over independently trained
        models averages out the training noise a single model's scores carry (as TRAK does; measured in
        experiments/RESULTS.md section 4)."""
        attr = self.attributor
        for i in range(len(attr.members), self.score.ensemble):
            trainer = dataclasses.replace(self.trainer, seed=int(self.trainer.seed) + 1000 * i)
            log.info("ensemble member %d/%d: trainer.seed=%d", i + 1, self.score.ensemble, trainer.seed)
            model, key, _ = self.trained(trainer)
            attr.add_member(model, model_key=key, solver=self.new_solver())
        return attr

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
    def swept_dampings(self) -> list[Damping]:
        """When this job is one of a multirun that sweeps ``solver.damping`` (``-m solver.damping=1e-4,1e-3,...``),
        the sweep's values, in the sweep's order (the same for every job): the engine scores them in one pass with
        the job's own, cached under a key the whole sweep shares, so the sweep's first job scores every value for
        the price of about one and the other jobs read their scores from the cache."""
        swept: list[Damping] = []
        for value in self.sweep_dampings:
            try:
                swept += [d for d in parse_dampings(value) if d not in swept]
            except ConfigError:  # another job's bad value is that job's error
                continue
        return swept

    def _scores(self, what: str, scores: Callable[[Attributor], torch.Tensor | None]) -> torch.Tensor | None:
        """``scores(engine)`` on the run's models (:meth:`ensemble`); logs ``time/<what>_s`` (all of it: the
        ensemble's models not yet cached are trained and fitted first), or ``score/<what>_partition`` and marks
        the run :attr:`partition_pending` while a partition job's share is all that is cached."""
        t0 = time.perf_counter()
        s = scores(self.ensemble())
        if s is None:
            i, k = self.partition
            self.tracker.log({f"score/{what}_partition": f"{i}/{k}"})
            self.partition_pending = True
            return None
        self.tracker.log({f"time/{what}_s": time.perf_counter() - t0})
        return s

    def report_convergence(self, what: str, record: dict) -> None:
        """Pass ``what``'s convergence record (a stage solving with :attr:`solver` itself, e.g. unlearn's step) to
        the engine: logged as ``solver/*@<damping>`` (worst over the run's passes), warned about when unconverged."""
        self.attributor.report_convergence(what, record)

    @cached_property
    def self_influence(self) -> torch.Tensor | None:
        """``[n_damping, n_train]`` self-influence with the configured solver (averaged over the ensemble)."""
        return self._scores("self", lambda a: a.self_influence(partition=self.partition))

    @cached_property
    def pairwise(self) -> torch.Tensor | None:
        """``[n_damping, n_query, n_train]`` pairwise scores for the query points (averaged over the ensemble)."""
        queries = self.test_data.subset(self.query_positions)
        return self._scores("pairwise", lambda a: a.pairwise(
            queries, query_key=self.query_positions.tolist(), query_rank=self.score.query_rank,
            partition=self.partition))

    def baseline_self_influence(self, solver_name: str) -> torch.Tensor:
        """Self-influence ``[n_train]`` with another solver of the ``solver`` group (e.g. ``identity``)."""
        attr = self.attributor_for(self.model, self.model_key, self.new_solver(self.solver_node(solver_name)))
        return attr.self_influence(dampings=attr.dampings[:1])[0]

    def save_scores(self, name: str, scores: torch.Tensor, extra: dict[str, torch.Tensor]) -> Path:
        """``scores/<name>.safetensors``: ``scores_by_damping`` ``[n_damping, ...]`` (the API's shape, the damping
        axis kept for one damping too) and ``scores``, the first damping's ``[...]``; metadata:
        ``dampings``, ``solver``, ``ensemble`` and ``convergence`` (JSON: per damping label, the fields of
        :class:`~influencelab.solvers.base.Convergence`; ``{}`` for direct solvers)."""
        tensors = {"scores": scores[0].clone(), "scores_by_damping": scores, "train_indices": self.train_data.indices,
                   **extra}
        meta = {"dampings": json.dumps(self.solver.dampings), "solver": self.solver.label,
                "ensemble": str(self.score.ensemble),
                # per damping: how converged an iterative solver's scores are ({} for direct solvers)
                "convergence": json.dumps(diagnostics_json(self.attributor.convergence_by_pass.get(name, {})))}
        path = self.tracker.save_tensors(f"scores/{name}.safetensors", tensors, meta)
        self.tracker.artifact(f"{name}-scores", path)
        return path

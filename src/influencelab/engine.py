"""The scoring engine behind :class:`~influencelab.api.Attributor`, and so behind the CLI as well: one :class:`Member`
per trained model (its solver, fitted under the model's own cache key, and the scores computed on it), and the
scoring policies over the members that the API and the CLI share:

* **ensembles**: scores averaged over independently trained models (the mean of the members' scores; for a solver
  with per-training-point weights, TRAK's ``1 - p``, the mean of the unweighted scores times the mean weights:
  :meth:`~influencelab.solvers.base.Solver.defer_weights`, whose :meth:`~.Solver.score_config` keys those scores);
* **damping sharing**: one pass over a list of dampings (e.g. every value of a multirun's ``solver.damping`` sweep,
  cached under one key the sweep's jobs share), keeping the rows of the caller's own dampings; should another
  damping make the shared pass diverge, the own dampings are scored alone (:func:`pass_dampings`,
  :func:`for_own_dampings`);
* **partitions**: ``(i, k)`` computes only the i-th of k shares of the training set's score chunks; the result is
  ``None`` until every share is cached, then the full scores (:func:`~influencelab.scores.parse_partition`);
* **convergence reporting**: per scoring pass and damping, the worst :class:`~influencelab.solvers.base.Convergence`
  over the members (:func:`convergence_metrics`, :func:`warn_unconverged`).

Messages name the settings a user changes in the caller's vocabulary (:class:`SettingNames`): the API's keyword
arguments, or the CLI's config keys.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import distributed
from .artifacts import Artifacts, FitInfo
from .data.base import LabeledData
from .errors import SolverDivergedError
from .memory import (
    Plan,
    budget_bytes,
    log_plan,
    pin_mmap_threshold,
    plan_pairwise,
    plan_self,
    release_freed,
    shape_of,
)
from .metric_names import damping_label, metric_name
from .scores import pairwise_scores, precondition_queries, query_gradients, self_scores
from .solvers.base import Convergence, Damping, Solver, merge_diagnostics

log = logging.getLogger("influencelab")

Partition = tuple[int, int]


@dataclass(frozen=True)
class SettingNames:
    """What the engine's warnings and hints call the settings a user changes: the API's keyword arguments by
    default (``max_iter``, ``damping``, ``partition``); the CLI's Context passes :data:`CLI_NAMES`."""

    solver: str = ""  # prefix of the solver's keys: max_iter -> solver.max_iter
    partition: str = "partition"
    cache: str = "cache_dir"
    memory: str = "memory_gb"


API_NAMES = SettingNames()
CLI_NAMES = SettingNames(solver="solver.", partition="score.partition", cache="paths.cache",
                         memory="score.memory_gb")


def on_solver(model: nn.Module, solver: Solver) -> nn.Module:
    """``model`` on the solver's device and dtype (a copy when they differ), in eval mode."""
    p = next(model.parameters())
    if p.device != solver.device or p.dtype != solver.dtype:
        model = copy.deepcopy(model).to(device=solver.device, dtype=solver.dtype)
    return model.eval()


class Member:
    """One trained model of an attributor (an ensemble has several): its own solver, fitted on the shared training
    data under the model's own key (so each member's factors and score chunks are cached like a single model's),
    and the scores computed on it. ``diagnostics``: its last call's convergence per damping.

    ``memory_gb``: the budget of a scoring pass (``None``: the memory the device has free), met by the query chunk
    and training batch :mod:`influencelab.memory` plans; ``plan``: the last pass's."""

    def __init__(self, model: nn.Module, solver: Solver, model_key: str, artifacts: Artifacts, batch_size: int,
                 chunk_size: int, memory_gb: float | None = None, names: SettingNames = API_NAMES):
        self.solver = solver
        self.model = on_solver(model, solver)
        self.model_key = model_key
        self.artifacts, self.batch_size, self.chunk_size = artifacts, batch_size, chunk_size
        self.memory_gb, self.names = memory_gb, names
        self.fit_info: FitInfo | None = None
        self.fitted_on: LabeledData | None = None  # the training data of the fit (what it kept may serve it)
        self.diagnostics: dict[Damping, Convergence] = {}
        self.plan: Plan | None = None

    @property
    def fit_key(self) -> str:
        assert self.fit_info is not None, "call fit() first"
        return self.fit_info.key

    def fit(self, train: LabeledData) -> FitInfo:
        """Fit the solver on ``train`` (or load its cached factors)."""
        self.solver.setup(self.model)
        self.fit_info = self.artifacts.fit(self.solver, self.model, train, self.model_key)
        self.fitted_on = train
        return self.fit_info

    def query_gradients(self, queries: LabeledData) -> torch.Tensor:
        """Flat gradients ``[n_query, P]`` of the task's measurement of each query."""
        return query_gradients(self.solver, self.model, queries, self.batch_size)

    def precondition(self, vectors: torch.Tensor, dampings: list[Damping]) -> torch.Tensor:
        """``(G + λI)^-1 v`` for flat vectors ``[k, P]`` and each damping: ``[n_damping, k, P]``."""
        self.solver.reset_diagnostics()
        out = precondition_queries(self.solver, vectors, dampings).reshape(len(dampings), len(vectors), -1)
        self.diagnostics = self.solver.diagnostics()
        return out

    def pairwise(self, queries: LabeledData, train: LabeledData, train_key: Any, dampings: list[Damping],
                 query_key: Any, query_rank: int | None, partition: Partition) -> torch.Tensor | None:
        """Scores ``[n_damping, n_query, n_train]``; ``None`` while other partitions' chunks are missing. Queries
        are taken in the chunks the memory plan allows, each one pass over the training data (with its own cache
        key; one chunk keeps the key of the whole)."""
        budget, explicit = budget_bytes(self.memory_gb, self.solver.device)
        if explicit:
            pin_mmap_threshold(self.solver.device)
        n_query, n_damping = len(queries), len(dampings)
        shape = shape_of(self.solver, self.model, train, n_damping, self.chunk_size)
        self.plan = plan = plan_pairwise(shape, n_query, self.batch_size, budget, explicit,
                                         fixed_queries=query_rank is not None, key=self.names.memory)
        log_plan("pairwise", plan, n_query, self.batch_size, explicit)
        slices = plan.query_slices(n_query)
        out: torch.Tensor | None = None
        missing, record = False, {}
        for q0, q1 in slices:
            part = queries if len(slices) == 1 else queries.subset(torch.arange(q0, q1))
            grads = query_gradients(self.solver, self.model, part, plan.batch_size)
            release_freed(self.solver.device)  # (on the CPU, freed pieces are returned between the phases)
            self.solver.reset_diagnostics()
            # grads ([q, P], gigabytes for big models) are not needed afterwards: solved in place where possible
            pre = precondition_queries(self.solver, grads, dampings, consume=True)
            del grads
            release_freed(self.solver.device)
            record = merge_diagnostics(record, self.solver.diagnostics())
            extra = [query_key, query_rank] + ([[q0, q1]] if len(slices) > 1 else []) + \
                ([sc] if (sc := self.solver.score_config()) else [])
            key = self.artifacts.score_key("pairwise", self.fit_key, dampings, train_key, extra)
            s = pairwise_scores(self.solver, self.model, train, pre, self.artifacts, key, plan.batch_size,
                                self.chunk_size, partition, query_rank, fitted=train is self.fitted_on)
            del pre
            if s is None:
                missing = True
            elif len(slices) == 1:
                out = s.reshape(n_damping, n_query, -1)
            else:
                if out is None:
                    out = s.new_empty(n_damping, n_query, s.shape[-1])
                out[:, q0:q1] = s.view(n_damping, q1 - q0, -1)
            del s
            if len(slices) > 1:
                release_freed(self.solver.device)
        self.diagnostics = record
        return None if missing else out

    def self_influence(self, train: LabeledData, train_key: Any, dampings: list[Damping],
                       partition: Partition) -> torch.Tensor | None:
        """Self-influence ``[n_damping, n_train]``; ``None`` while other partitions' chunks are missing."""
        key = self.artifacts.score_key("self", self.fit_key, dampings, train_key, self.solver.score_config() or None)
        budget, explicit = budget_bytes(self.memory_gb, self.solver.device)
        if explicit:
            pin_mmap_threshold(self.solver.device)
        shape = shape_of(self.solver, self.model, train, len(dampings), self.chunk_size)
        self.plan = plan = plan_self(shape, self.batch_size, budget, explicit, key=self.names.memory)
        log_plan("self-influence", plan, 0, self.batch_size, explicit)
        self.solver.reset_diagnostics()
        out = self_scores(self.solver, self.model, train, dampings, self.artifacts, key, plan.batch_size,
                          self.chunk_size, partition)
        self.diagnostics = self.solver.diagnostics()
        return out


# -- damping sharing ------------------------------------------------------------------------------------------------
def pass_dampings(own: list[Damping], shared: Sequence[Damping], solver: Solver) -> list[Damping]:
    """The dampings scored in one pass for a call whose own dampings are ``own``: ``shared`` (in its order, the same
    for every caller, hence one cache key for all of them), then the own ones it lacks. Only for solvers whose fit
    does not depend on the damping (otherwise ``own``)."""
    if not solver.damping_free_fit or not shared:
        return own
    out = list(shared) + [d for d in own if d not in shared]
    return own if out == own else out


def for_own_dampings(compute: Callable[[list[Damping]], torch.Tensor | None], own: list[Damping],
                     dampings: list[Damping]) -> torch.Tensor | None:
    """``compute(dampings)`` (scores ``[n_damping, ...]``), then the rows of the ``own`` dampings. Should another
    damping make the shared pass diverge (e.g. LiSSA at a very large λ), the own dampings are scored alone (and
    whoever owns that damping gets the error when scoring it)."""
    if dampings == own:
        return compute(own)
    log.info("damping %s scored in the sweep's shared pass over dampings %s (one cached pass: the first job scores "
             "it, the others reuse it)", ", ".join(map(damping_label, own)), ", ".join(map(damping_label, dampings)))
    try:
        scores = compute(dampings)
    except SolverDivergedError as e:
        log.warning("the shared pass over dampings %s failed (%s); scoring %s alone", dampings, e, own)
        return compute(own)
    return None if scores is None else scores[[dampings.index(d) for d in own]]


# -- convergence reporting ------------------------------------------------------------------------------------------
def convergence_metrics(record: Mapping[Damping, Convergence]) -> dict[str, Any]:
    """``solver/{rel_residual_max,rel_residual_mean,iterations,converged,solve_s}@<damping>`` (and LiSSA's
    ``solver/{scale,repeats}@<damping>``, CG's ``solver/floor@<damping>``, the rule applied ``solver/rule@<damping>``
    and an unconverged solve's ``solver/suggest_<key>@<damping>``) of a convergence record."""
    metrics: dict[str, Any] = {}
    for d, c in record.items():
        metrics.update({metric_name("solver/rel_residual_max", d): c.rel_residual_max,
                        metric_name("solver/rel_residual_mean", d): c.rel_residual_mean,
                        metric_name("solver/iterations", d): c.iterations,
                        metric_name("solver/converged", d): c.converged,
                        metric_name("solver/solve_s", d): c.solve_s})
        if c.scale is not None:
            metrics[metric_name("solver/scale", d)] = c.scale
        # the rule that chose scale / depth / acceptance (LiSSA's repeats, CG's float floor); what would converge
        metrics.update({metric_name(f"solver/{k}", d): v for k, v in (("repeats", c.repeats), ("floor", c.floor),
                                                                     ("rule", c.rule)) if v is not None})
        metrics.update({metric_name(f"solver/suggest_{k}", d): v for k, v in (c.suggest or {}).items()})
    return metrics


def warn_unconverged(what: str, record: Mapping[Damping, Convergence], solver: Solver,
                     names: SettingNames = API_NAMES) -> list[str]:
    """Log a warning for each unconverged damping of ``what``'s record, naming the fix (more iterations or a
    larger damping); returns the messages."""
    key, p = solver.iteration_key, names.solver
    fix = f"raise {p}{key} (now {getattr(solver, key)}) or {p}damping" if key else f"raise {p}damping"
    out = []
    for d, c in record.items():
        if c.converged:
            continue
        own = fix
        if c.suggest:  # (what the solver estimated would converge, e.g. LiSSA's depth from its measured contraction)
            now = ", ".join(f"{k}={getattr(solver, k, '?')}" for k in c.suggest)
            own = (f"set {' and '.join(f'{p}{k}={v:g}' for k, v in c.suggest.items())} (estimated from the measured "
                   f"residuals, as the convergence record's rule says; now {now}) or raise {p}damping")
        msg = (f"the {what} scores at {p}damping={damping_label(d)} are UNCONVERGED: {solver.label}'s worst relative "
               f"residual ||(G + λI) x - v|| / ||v|| is {c.rel_residual_max:.3g} > {c.tol:g} ({c.iterations} "
               f"iterations; measured on {c.residual_on}); {own}")
        out.append(msg)
        if distributed.is_main():
            log.warning("%s", msg)
    return out

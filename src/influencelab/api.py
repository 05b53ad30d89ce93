"""The Python API: influence scores for your own model and data, on the same engine (and path) as the CLI.

.. code-block:: python

    from influencelab import Attributor
    attr = Attributor(model, solver="ekfac", damping=[1e-3, 1e-1])     # task: classification by default
    attr.fit(train)                                                  # a Dataset / DataLoader of (x, y)

    lm = Attributor(gpt, task=LanguageModelingTask(), solver="ekfac")  # batches as your data yields them
    lm.fit(texts).pairwise(prompts)                                  # Datasets of {"input_ids", "attention_mask"}
    scores = attr.pairwise(queries, train)                           # [n_damping, n_query, n_train]
    self_inf = attr.self_influence(train)                            # [n_damping, n_train]

    ens = Attributor([model_a, model_b, model_c], cache_dir="cache")  # an ensemble: scores averaged over the models
    part = ens.fit(train).pairwise(queries, partition=(0, 2))        # None until every share is cached
    ens.convergence                                                  # per damping, worst over models and passes

Influence is ``I(z, z_q) = ∇m(z_q)^T (G + λI)^-1 ∇L(z)`` (positive = helpful): ``L``, ``G``'s convention and the
query measurement ``m`` come from the task (:mod:`influencelab.tasks`). Every solver in ``conf/solver/`` is
reachable by name (its YAML's defaults, composed by Hydra, overridden by keyword arguments), or pass a
:class:`~influencelab.solvers.base.Solver`. With ``cache_dir``, fitted factors and score chunks are cached under
the same keys as the CLI's (a re-run reuses them; a killed fit resumes). The CLI's ``score.ensemble``,
``score.partition``, damping sweeps and convergence metrics are this class's features (:mod:`influencelab.engine`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed
from .artifacts import Artifacts, FitInfo, data_digest, digest, model_digest
from .compose import solver_config
from .data.base import BatchData, LabeledData, as_data
from .engine import (
    API_NAMES,
    Member,
    SettingNames,
    convergence_metrics,
    for_own_dampings,
    on_solver,
    pass_dampings,
    warn_unconverged,
)
from .errors import ConfigError
from .memory import check_budget
from .scores import parse_partition
from .solvers.base import Convergence, Damping, Solver, merge_diagnostics, parse_dampings
from .tasks import Task, resolve_task

log = logging.getLogger("influencelab")

Data = LabeledData | BatchData | Dataset | DataLoader


def _data_digest(data: LabeledData | BatchData) -> str:
    """Key of a data set given as an object (:func:`~influencelab.artifacts.data_digest`; generic batches: every
    tensor of them)."""
    return data_digest(data) if isinstance(data, LabeledData) else "batches-" + digest(*data.digest_tensors())


class Attributor:
    """Influence scores of one trained model, or of an ensemble of them, with one solver configuration.

    ``model``: any ``nn.Module`` (put in eval mode; a copy is made when the solver's device/dtype differ), or a
    list of them: an **ensemble** of independently trained models (e.g. other seeds, as TRAK and dattri's
    checkpoints do), each with its own fit of the solver; :meth:`pairwise` and :meth:`self_influence` return the
    mean of the models' scores, which averages out the training noise one model's scores carry. More members can
    be added with :meth:`add_member`. ``task``: ``"classification"`` (cross-entropy, default), ``"regression"``
    (squared error), ``"language_modeling"`` (a causal LM's summed next-token cross-entropy per sequence) or a
    :class:`~influencelab.tasks.Task`; the task reads the batches as the data yields them (``(x, y)`` pairs, or e.g.
    dicts of ``input_ids``/``attention_mask``/``labels``, collated once with a DataLoader's ``collate_fn``). ``solver``: a name (``ekfac``, ``kfac``, ``lissa``,
    ``cg``, ``exact``, ``identity``) or a :class:`Solver` (an ensemble's other members get copies of it).
    ``damping``: a float, ``"auto"`` or a list (results get a leading ``n_damping`` axis either way). ``modules``:
    ``all``, ``last:K``, ``re:PATTERN`` or module names. ``solver_args``: any other key of the solver's config (e.g.
    ``curvature="empirical_fisher"``, ``depth=100``). ``batch_size`` among them is the solver's own (EK-FAC's
    fitting batch, LiSSA's recursion batch); the batch of training points scored at a time is ``score_batch_size``
    (the CLI's ``score.batch_size``), beside ``chunk_size``. ``memory_gb``: the GB (2^30 bytes) a scoring pass may
    add to what is held (the CLI's ``score.memory_gb``; ``None``: the memory the device has free): queries are then
    scored in chunks, each one pass over the training data, with the same scores, and the training batch is cut as
    needed (:mod:`influencelab.memory`); a pass that cannot fit is a one-line error naming the smallest budget.
    ``cache_dir``: cache fitted factors and score chunks there (``None``: nothing is written), or an
    :class:`~influencelab.artifacts.Artifacts` store (the CLI passes its own).
    ``model_key`` (one per model for an ensemble)/``data_key``: what identifies the model / training data in cache
    keys (default: digests of the weights / data; the CLI passes its config-based keys).
    ``shared_dampings``: dampings scored in the same pass as each call's own (and cached under one key), for
    solvers whose fit does not depend on the damping: the jobs of a sweep over the damping pass the sweep's values,
    the first job scores them all for the price of about one and the others read their rows from the cache.
    Results keep the own dampings' rows; should another damping make the shared pass diverge, the own dampings are
    scored alone. ``on_metrics``: called with each scoring pass's ``solver/*@<damping>`` convergence metrics
    (e.g. ``wandb.log``; the CLI logs them to its tracker). ``setting_names``: how warnings name the settings to
    change (the CLI passes its config keys).

    Convergence of iterative solvers (CG and LiSSA; ``{}`` for the others), per damping, a
    :class:`~influencelab.solvers.base.Convergence` each (the worst relative residual ``||(G + λI) x - v|| / ||v||``
    over every solved vector, its mean, the iterations, ``converged``):

    * ``diagnostics``: the last call's (:meth:`precondition`, :meth:`pairwise`, :meth:`self_influence`), worst over
      the members (for self-influence over every training batch, cached chunks included);
    * ``convergence_by_pass``: per scoring pass (``pairwise``, ``self``, or a name given to
      :meth:`report_convergence`), its latest record;
    * ``convergence``: the worst over the passes. An unconverged damping of a scoring pass is a logged warning
      naming the fix.
    """

    def __init__(self, model: nn.Module | Sequence[nn.Module], task: Task | str | None = None,
                 solver: str | Solver = "ekfac", damping: Any = None, modules: str | Sequence[str] | None = None,
                 cache_dir: str | Path | Artifacts | None = None,
                 device: str | None = None, score_batch_size: int = 256, chunk_size: int = 4096,
                 memory_gb: float | None = None, model_key: str | Sequence[str] | None = None, checkpoint_s: float = 30.0,
                 shared_dampings: Any = None, on_metrics: Callable[[dict[str, Any]], None] | None = None,
                 setting_names: SettingNames = API_NAMES, **solver_args: Any):
        models = [model] if isinstance(model, nn.Module) else list(model)
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise ConfigError("model must be an nn.Module or a non-empty list of them (an ensemble)")
        keys = [model_key] * len(models) if model_key is None or isinstance(model_key, str) else list(model_key)
        if len(keys) != len(models) or (isinstance(model_key, str) and len(models) > 1):
            raise ConfigError(f"model_key: give one key per model ({len(models)} models)")
        self.task = resolve_task(task)
        if isinstance(solver, Solver):
            if damping is not None or modules is not None or solver_args:
                raise ConfigError("damping/modules/solver arguments are given to the Solver object itself; "
                                  "pass them when constructing it, or pass solver by name")
            solver.task = self.task if task is not None else solver.task
            pristine = copy.deepcopy(solver)  # the other members' solvers: copies of it, unfitted
            self._new_solver: Callable[[], Solver] = lambda: copy.deepcopy(pristine)
            first = solver
        else:
            args = {**solver_args, **({"damping": damping} if damping is not None else {}),
                    **({"modules": modules} if modules is not None else {})}
            dev = device or str(next(models[0].parameters()).device)
            self._new_solver = lambda: solver_config(solver, args, device=dev, task=self.task)
            first = self._new_solver()
        if score_batch_size < 1 or chunk_size < 1:
            raise ConfigError(f"score_batch_size={score_batch_size}, chunk_size={chunk_size} are invalid: both must "
                              f"be >= 1")
        self.batch_size, self.chunk_size = int(score_batch_size), int(chunk_size)
        self.memory_gb = check_budget(memory_gb, setting_names.memory)
        self.artifacts = cache_dir if isinstance(cache_dir, Artifacts) else Artifacts(cache_dir, checkpoint_s)
        shared: list[Damping] = []
        for d in parse_dampings(shared_dampings) if shared_dampings not in (None, [], ()) else []:
            shared += [d] if d not in shared else []
        self.shared_dampings = shared
        self.on_metrics = on_metrics
        self.names = setting_names
        self.train: LabeledData | BatchData | None = None
        self.train_key: Any = None
        self.members: list[Member] = []
        for i, (m, key) in enumerate(zip(models, keys)):
            self.add_member(m, key, first if i == 0 else None)
        self.diagnostics: dict[Damping, Convergence] = {}
        self.convergence_by_pass: dict[str, dict[Damping, Convergence]] = {}

    # -- the models -----------------------------------------------------------------------------------------------
    def add_member(self, model: nn.Module, model_key: str | None = None, solver: Solver | None = None) -> Member:
        """Add a model to the ensemble, with its own ``solver`` (default: a new one of the same configuration),
        fitted at once when :meth:`fit` has been called. ``model_key``: its key in the cache (default: a digest
        of its weights)."""
        solver = solver if solver is not None else self._new_solver()
        solver.for_member(len(self.members))
        if self.members and solver.dampings != self.dampings:
            raise ConfigError(f"an ensemble's members score the same dampings: {solver.dampings} != {self.dampings}")
        model = on_solver(model, solver)
        m = Member(model, solver, model_key or self._key(model_digest, model), self.artifacts, self.batch_size,
                   self.chunk_size, self.memory_gb, self.names)
        self.members.append(m)
        if self.train is not None:
            m.fit(self.train)
        return m

    @property
    def model(self) -> nn.Module:
        """The (first) model, on the solver's device and dtype."""
        return self.members[0].model

    @property
    def solver(self) -> Solver:
        """The (first) model's solver."""
        return self.members[0].solver

    @property
    def model_key(self) -> str:
        return self.members[0].model_key

    @property
    def dampings(self) -> list[Damping]:
        return list(self.solver.dampings)

    @property
    def fit_info(self) -> FitInfo | None:
        """The (first) model's fit: key, seconds, whether it came from the cache."""
        return self.members[0].fit_info

    @property
    def fit_key(self) -> str:
        return self.members[0].fit_key

    @property
    def fit_seconds(self) -> float:
        """What fitting the (first) model's solver took (when it was computed; when loaded, the cached time)."""
        return self.fit_info.seconds if self.fit_info is not None else 0.0

    # -- fitting -------------------------------------------------------------------------------------------
    def _key(self, digest_fn, obj) -> str:
        """A content digest of ``obj`` for cache keys; without a cache nothing is looked up, so nothing is hashed."""
        return digest_fn(obj) if self.artifacts.cache is not None else "uncached"

    def fit(self, train: Data, data_key: Any = None) -> Attributor:
        """Fit every model's solver on the training data (or load the cached factors). Returns ``self``."""
        self.train = as_data(train, self.task)
        self.train_key = data_key if data_key is not None else self._key(_data_digest, self.train)
        for m in self.members:
            m.fit(self.train)
        return self

    def _train(self, train: Data | None) -> tuple[LabeledData | BatchData, Any]:
        if self.train is None:
            raise ConfigError("Attributor.fit(train) must come before scoring")
        if train is None or train is self.train:
            return self.train, self.train_key
        data = as_data(train, self.task)
        return data, self._key(_data_digest, data)

    def _dampings(self, dampings: Any) -> list[Damping]:
        return self.dampings if dampings is None else parse_dampings(dampings)

    # -- per-model primitives (the first model; ``members[i]`` has them for the others) ---------------------------
    def query_gradients(self, queries: Data) -> torch.Tensor:
        """Flat gradients ``[n_query, P]`` of the task's measurement of each query (the first model's)."""
        return self.members[0].query_gradients(as_data(queries, self.task))

    def precondition(self, vectors: torch.Tensor, dampings: Any = None) -> torch.Tensor:
        """``(G + λI)^-1 v`` for flat vectors ``[k, P]`` and each damping: ``[n_damping, k, P]`` (the first
        model's curvature)."""
        out = self.members[0].precondition(vectors, self._dampings(dampings))
        self.diagnostics = self.members[0].diagnostics
        return out

    # -- scores ---------------------------------------------------------------------------------------------------
    def pairwise(self, queries: Data, train: Data | None = None, dampings: Any = None, query_key: Any = None,
                 query_rank: int | None = None, partition: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Scores ``[n_damping, n_query, n_train]`` of every training point (``train``; default: the fitted
        data) for each query, averaged over the ensemble's models. ``query_rank``: optional low-rank compression
        of the preconditioned queries. ``partition=(i, k)``: compute (and cache) only the i-th of k shares of the
        training set's chunks; ``None`` until every share is cached, then the full scores (needs ``cache_dir``
        for more than one share: the shares meet in the cache)."""
        data, data_key = self._train(train)
        q = as_data(queries, self.task)
        qkey = query_key if query_key is not None else self._key(_data_digest, q)
        return self._score("pairwise", data, self._dampings(dampings), partition,
                           lambda m, d, p: m.pairwise(q, data, data_key, d, qkey, query_rank, p))

    def self_influence(self, train: Data | None = None, dampings: Any = None,
                       partition: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Self-influence ``g_z^T (G + λI)^-1 g_z`` of every training point: ``[n_damping, n_train]``, averaged
        over the ensemble's models. ``partition``: as in :meth:`pairwise`."""
        data, data_key = self._train(train)
        return self._score("self", data, self._dampings(dampings), partition,
                           lambda m, d, p: m.self_influence(data, data_key, d, p))

    def _score(self, what: str, data: Any, own: list[Damping], partition: tuple[int, int] | None,
               compute: Callable[[Member, list[Damping], tuple[int, int]], torch.Tensor | None]
               ) -> torch.Tensor | None:
        """``compute(member, dampings, partition)`` for every member, over the shared pass's dampings, the own
        rows kept; their mean (for a solver with per-training-point weights, TRAK's ``1 - p``: the mean of the
        unweighted scores times the mean of the members' weights over ``data``), or ``None`` while a partition's
        share is all that is cached."""
        part = parse_partition(partition, key=self.names.partition)
        if part[1] > 1 and self.artifacts.cache is None:
            raise ConfigError(f"{self.names.partition}={part[0]}/{part[1]} needs a cache, where the partitions' "
                              f"shares meet: set {self.names.cache}")
        dampings = pass_dampings(own, self.shared_dampings, self.solver)
        if dampings != own and distributed.is_main():
            log.info("scoring all of the dampings %s in one pass (cached under one key); keeping %s", dampings, own)
        # TRAK's estimator: the mean of the models' unweighted scores times the mean of their weights (1 - p)
        deferred = len(self.members) > 1 and all(m.solver.has_train_weights for m in self.members)
        for m in self.members:
            m.solver.defer_weights(deferred)
        try:
            parts = [for_own_dampings(lambda d, m=m: compute(m, d, part), own, dampings) for m in self.members]
        finally:
            for m in self.members:
                m.solver.defer_weights(False)
        self.diagnostics = merge_diagnostics(*({d: c for d, c in m.diagnostics.items() if d in own}
                                               for m in self.members))
        if any(p is None for p in parts):
            i, k = part
            log.info("partition %d/%d of the %s scores is cached; run the other partitions, then the same call "
                     "(with any or no %s) returns the merged scores", i, k, what, self.names.partition)
            return None
        self.report_convergence(what, self.diagnostics)
        scores = parts[0] if len(parts) == 1 else torch.stack(parts).mean(0)
        if deferred:
            w = torch.stack([m.solver.train_weights(m.model, data).to(scores) for m in self.members]).mean(0)
            scores = scores * w
        return scores

    # -- convergence ----------------------------------------------------------------------------------------------
    @property
    def convergence(self) -> dict[Damping, Convergence]:
        """Per damping, the worst convergence over the scoring passes so far (and over the ensemble's models)."""
        return merge_diagnostics(*self.convergence_by_pass.values())

    def report_convergence(self, what: str, record: dict[Damping, Convergence]) -> dict[str, Any]:
        """Keep ``record`` as pass ``what``'s convergence (the engine does so for ``pairwise`` and ``self``; a
        caller solving with :attr:`solver` itself, e.g. the CLI's unlearning step, reports it here); returns
        the ``solver/*@<damping>`` metrics of the worst over every pass so far (``solve_s``: their summed solve
        time), also handed to ``on_metrics``, and warns for each unconverged damping of ``record``, with the fix."""
        self.convergence_by_pass[what] = dict(record)
        if not record:
            return {}
        metrics = convergence_metrics(self.convergence)
        if self.on_metrics is not None:
            self.on_metrics(metrics)
        warn_unconverged(what, record, self.solver, self.names)
        return metrics

"""The Python API: influence scores for your own model and data, on the same engine (and path) as the CLI.

.. code-block:: python

    from influencelab import Attributor
    attr = Attributor(model, solver="ekfac", damping=[1e-3, 1e-1])     # task: classification by default
    attr.fit(train)                                                  # a Dataset / DataLoader of (x, y)
    scores = attr.pairwise(queries, train)                           # [n_damping, n_query, n_train]
    self_inf = attr.self_influence(train)                            # [n_damping, n_train]

Influence is ``I(z, z_q) = ∇m(z_q)^T (G + λI)^-1 ∇L(z)`` (positive = helpful): ``L``, ``G``'s convention and the
query measurement ``m`` come from the task (:mod:`influencelab.tasks`). Every solver in ``conf/solver/`` is
reachable by name (its YAML's defaults, composed by Hydra, overridden by keyword arguments), or pass a
:class:`~influencelab.solvers.base.Solver`. With ``cache_dir``, fitted factors and score chunks are cached under
the same keys as the CLI's (a re-run reuses them; a killed fit resumes).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .artifacts import Artifacts, FitInfo, data_digest, model_digest
from .compose import solver_config
from .data.base import LabeledData, as_labeled
from .errors import ConfigError
from .scores import pairwise_scores, precondition_queries, query_gradients, self_scores
from .solvers.base import Convergence, Damping, Solver, parse_dampings
from .tasks import Task, resolve_task

log = logging.getLogger("influencelab")

Data = LabeledData | Dataset | DataLoader


class Attributor:
    """Influence scores of one trained model with one solver.

    ``model``: any ``nn.Module`` (put in eval mode; a copy is made when the solver's device/dtype differ).
    ``task``: ``"classification"`` (cross-entropy, default), ``"regression"`` (squared error) or a
    :class:`~influencelab.tasks.Task`. ``solver``: a name (``ekfac``, ``kfac``, ``lissa``, ``cg``, ``exact``,
    ``identity``) or a :class:`Solver`. ``damping``: a float, ``"auto"`` or a list (results get a leading
    ``n_damping`` axis either way). ``modules``: ``all``, ``last:K``, ``re:PATTERN`` or module names.
    ``solver_args``: any other key of the solver's config (e.g. ``curvature="empirical_fisher"``, ``depth=100``).
    ``batch_size`` among them is the solver's own (EK-FAC's fitting batch, LiSSA's recursion batch); the batch of
    training points scored at a time is ``score_batch_size`` (the CLI's ``score.batch_size``), beside ``chunk_size``.
    ``cache_dir``: cache fitted factors and score chunks there (``None``: nothing is written), or an
    :class:`~influencelab.artifacts.Artifacts` store (the CLI passes its own).
    ``model_key``/``data_key``: what identifies the model / training data in cache keys (default: digests of
    the weights / data; the CLI passes its config-based keys).

    ``diagnostics``: after :meth:`precondition`, :meth:`pairwise` or :meth:`self_influence`, how converged that
    call's results are per damping (iterative solvers, CG and LiSSA; ``{}`` for the others), a
    :class:`~influencelab.solvers.base.Convergence` each: the worst relative residual
    ``||(G + λI) x - v|| / ||v||`` over every solved vector (for self-influence, over every training batch,
    including cached chunks), its mean, the iterations, and ``converged``.
    """

    def __init__(self, model: nn.Module, task: Task | str | None = None, solver: str | Solver = "ekfac",
                 damping: Any = None, modules: str | Sequence[str] | None = None,
                 cache_dir: str | Path | Artifacts | None = None,
                 device: str | None = None, score_batch_size: int = 256, chunk_size: int = 4096,
                 model_key: str | None = None, checkpoint_s: float = 30.0, **solver_args: Any):
        self.task = resolve_task(task)
        if isinstance(solver, Solver):
            if damping is not None or modules is not None or solver_args:
                raise ConfigError("damping/modules/solver arguments are given to the Solver object itself; "
                                  "pass them when constructing it, or pass solver by name")
            solver.task = self.task if task is not None else solver.task
            self.solver = solver
        else:
            args = {**solver_args, **({"damping": damping} if damping is not None else {}),
                    **({"modules": modules} if modules is not None else {})}
            dev = device or str(next(model.parameters()).device)
            self.solver = solver_config(solver, args, device=dev, task=self.task)
        if score_batch_size < 1 or chunk_size < 1:
            raise ConfigError(f"score_batch_size={score_batch_size}, chunk_size={chunk_size} are invalid: both must "
                              f"be >= 1")
        self.batch_size, self.chunk_size = int(score_batch_size), int(chunk_size)
        self.artifacts = cache_dir if isinstance(cache_dir, Artifacts) else Artifacts(cache_dir, checkpoint_s)
        self.model = self._on_solver(model)
        self.model_key = model_key or self._key(model_digest, self.model)
        self.fit_info: FitInfo | None = None
        self.train: LabeledData | None = None
        self.train_key: Any = None
        self.diagnostics: dict[Damping, Convergence] = {}

    # -- fitting -------------------------------------------------------------------------------------------
    def _key(self, digest_fn, obj) -> str:
        """A content digest of ``obj`` for cache keys; without a cache nothing is looked up, so nothing is hashed."""
        return digest_fn(obj) if self.artifacts.cache is not None else "uncached"

    def _on_solver(self, model: nn.Module) -> nn.Module:
        p = next(model.parameters())
        if p.device != self.solver.device or p.dtype != self.solver.dtype:
            model = copy.deepcopy(model).to(device=self.solver.device, dtype=self.solver.dtype)
        return model.eval()

    @property
    def dampings(self) -> list[Damping]:
        return list(self.solver.dampings)

    @property
    def fit_key(self) -> str:
        assert self.fit_info is not None, "call fit() first"
        return self.fit_info.key

    @property
    def fit_seconds(self) -> float:
        return self.fit_info.seconds if self.fit_info is not None else 0.0

    def fit(self, train: Data, data_key: Any = None) -> Attributor:
        """Fit the solver on the training data (or load its cached factors). Returns ``self``."""
        self.train = as_labeled(train)
        self.train_key = data_key if data_key is not None else self._key(data_digest, self.train)
        self.solver.setup(self.model)
        self.fit_info = self.artifacts.fit(self.solver, self.model, self.train, self.model_key)
        return self

    def _train(self, train: Data | None) -> tuple[LabeledData, Any]:
        if self.fit_info is None:
            raise ConfigError("Attributor.fit(train) must come before scoring")
        if train is None or train is self.train:
            return self.train, self.train_key
        data = as_labeled(train)
        return data, self._key(data_digest, data)

    def _dampings(self, dampings: Any) -> list[Damping]:
        return self.dampings if dampings is None else parse_dampings(dampings)

    # -- scores -------------------------------------------------------------------------------------------
    def query_gradients(self, queries: Data) -> torch.Tensor:
        """Flat gradients ``[n_query, P]`` of the task's measurement of each query."""
        return query_gradients(self.solver, self.model, as_labeled(queries), self.batch_size)

    def precondition(self, vectors: torch.Tensor, dampings: Any = None) -> torch.Tensor:
        """``(G + λI)^-1 v`` for flat vectors ``[k, P]`` and each damping: ``[n_damping, k, P]``."""
        d = self._dampings(dampings)
        self.solver.reset_diagnostics()
        out = precondition_queries(self.solver, vectors, d).reshape(len(d), len(vectors), -1)
        self.diagnostics = self.solver.diagnostics()
        return out

    def pairwise(self, queries: Data, train: Data | None = None, dampings: Any = None, query_key: Any = None,
                 query_rank: int | None = None, partition: tuple[int, int] = (0, 1)) -> torch.Tensor | None:
        """Scores ``[n_damping, n_query, n_train]`` of every training point (``train``; default: the fitted
        data) for each query. ``query_rank``: optional low-rank compression of the preconditioned queries.
        ``partition=(i, k)``: compute only the i-th of k sets of chunks (``None`` until all are cached)."""
        data, data_key = self._train(train)
        q = as_labeled(queries)
        grads = query_gradients(self.solver, self.model, q, self.batch_size)
        d = self._dampings(dampings)
        self.solver.reset_diagnostics()
        # grads ([n_query, P], gigabytes for big models) are not needed afterwards: solved in place where possible
        pre = precondition_queries(self.solver, grads, d, consume=True)
        del grads
        self.diagnostics = self.solver.diagnostics()
        qkey = query_key if query_key is not None else self._key(data_digest, q)
        key = self.artifacts.score_key("pairwise", self.fit_key, d, data_key, [qkey, query_rank])
        s = pairwise_scores(self.solver, self.model, data, pre, self.artifacts, key, self.batch_size,
                            self.chunk_size, partition, query_rank)
        return None if s is None else s.reshape(len(d), len(q), -1)

    def self_influence(self, train: Data | None = None, dampings: Any = None,
                       partition: tuple[int, int] = (0, 1)) -> torch.Tensor | None:
        """Self-influence ``g_z^T (G + λI)^-1 g_z`` of every training point: ``[n_damping, n_train]``."""
        data, data_key = self._train(train)
        d = self._dampings(dampings)
        key = self.artifacts.score_key("self", self.fit_key, d, data_key)
        self.solver.reset_diagnostics()
        out = self_scores(self.solver, self.model, data, d, self.artifacts, key, self.batch_size,
                          self.chunk_size, partition)
        self.diagnostics = self.solver.diagnostics()
        return out

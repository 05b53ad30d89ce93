"""The one interface every inverse-curvature solver implements.

A solver approximates ``(G + λI)^-1`` on the tracked parameters (see :mod:`.layout`), where ``G`` is
the mean per-example curvature of the task's training loss (:mod:`influencelab.tasks`; cross-entropy by
default) at the trained parameters:

* ``curvature="fisher"`` (default): true Fisher = Gauss-Newton (``J^T H_out J``). Product-based solvers
  (exact, cg, lissa) use it exactly; EK-FAC/K-FAC estimate it with targets sampled from the model.
* ``"empirical_fisher"``: mean of ``g g^T`` with the training targets.
* ``"hessian"``: the exact Hessian (product-based solvers only).

``fit`` computes whatever the solver needs once (factors, nothing, a dense matrix); ``precondition`` applies
``(G + λI)^-1`` to many flat vectors at once. Direct solvers (exact, identity, EK-FAC, K-FAC) subclass :class:`Solver`;
the iterative ones (CG, LiSSA) subclass :class:`~.iterative.IterativeSolver`, which adds the curvature products,
the optional preconditioner and the convergence record they share. Damping is applied at precondition time, so one
fit serves every damping value when the solver allows it (``damping`` may be a float, ``"auto"`` or a list of
those). ``damping="auto"`` has one meaning for every solver: ``0.1 x`` the mean eigenvalue of the solver's ``G``
(``trace(G) / P``; :meth:`Solver.resolve_damping`). Influence of training point z on query q is
then ``g_q^T (G + λI)^-1 g_z`` (positive = helpful: upweighting z lowers the query loss).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ..cache import Snapshots
from ..data.base import LabeledData, batch_to
from ..errors import ConfigError, check
from ..metric_names import damping_label
from ..tasks import ClassificationTask, Task, resolve_task
from .layout import ParamLayout

log = logging.getLogger(__name__)

Damping = float | str  # a float > 0 or "auto"

#: ``damping="auto"`` = AUTO_FRACTION x the mean eigenvalue of the solver's curvature, for every solver
AUTO_FRACTION = 0.1

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: ``solver.autocast``: lower precision for the forward/backward passes that produce per-example gradients
#: and EK-FAC statistics; sums, eigendecompositions and inverses stay in ``solver.dtype`` / float64
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dampings(value: Any) -> list[Damping]:
    """``solver.damping`` -> list of floats / ``"auto"``; one-line error otherwise."""
    values = list(value) if isinstance(value, (list, tuple)) or (
        hasattr(value, "__iter__") and not isinstance(value, str)) else [value]
    out: list[Damping] = []
    for v in values:
        if isinstance(v, str) and v == "auto":
            out.append("auto")
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = float("nan")
        if not (f >= 0.0 and f < float("inf")):
            raise ConfigError(f"solver.damping={value!r} is invalid: use a float >= 0, 'auto', or a list of them")
        out.append(f)
    if not out:
        raise ConfigError("solver.damping=[] is invalid: give at least one value")
    return out


@dataclass(frozen=True)
class Convergence:
    """How far an iterative solver got at one damping, over every vector it was given since the last
    :meth:`Solver.reset_diagnostics` (worst case; several calls are merged with :meth:`merge`).

    ``rel_residual_*``: ``||(G + λI) x - v|| / ||v||`` per vector ``v`` and its solution ``x`` (max and mean),
    measured on ``residual_on`` (CG: the curvature it solves with; LiSSA: a held-out sample of training points);
    ``converged``: ``rel_residual_max <= tol``; ``iterations``: CG iterations run, LiSSA recursion depth."""

    damping: float  # the λ solved at (``"auto"`` resolved)
    iterations: int
    rel_residual_max: float
    rel_residual_mean: float
    tol: float
    converged: bool
    n_vectors: int
    residual_on: str
    scale: float | None = None  # LiSSA's scale s (preconditioned: 1 / step size)
    measure_s: float = 0.0  # wall time spent measuring the residual (not solving)
    solve_s: float = 0.0  # wall time of the solve itself (summed over merged calls)
    preconditioner: str | None = None  # solver.preconditioner (ekfac, kfac) or None
    repeats: int | None = None  # LiSSA's repeats (averaged recursions)
    floor: float | None = None  # the residual's measured floor: CG's float precision, LiSSA's held-out noise
    rule: str | None = None  # how the scale / depth / acceptance were chosen, in words (the documented rule applied)
    suggest: dict[str, Any] | None = None  # unconverged: settings estimated to converge, e.g. {"depth": 5300}

    def merge(self, other: Convergence) -> Convergence:
        n = self.n_vectors + other.n_vectors
        mean = (self.rel_residual_mean * self.n_vectors + other.rel_residual_mean * other.n_vectors) / max(n, 1)
        suggest = {k: max(v, (other.suggest or {}).get(k, v)) for k, v in (self.suggest or {}).items()} | {
            k: v for k, v in (other.suggest or {}).items() if k not in (self.suggest or {})}
        return replace(self, iterations=max(self.iterations, other.iterations),
                       rel_residual_max=max(self.rel_residual_max, other.rel_residual_max), rel_residual_mean=mean,
                       converged=self.converged and other.converged, n_vectors=n,
                       measure_s=self.measure_s + other.measure_s, solve_s=self.solve_s + other.solve_s,
                       residual_on=self.residual_on if self.residual_on == other.residual_on else "mixed",
                       floor=max((f for f in (self.floor, other.floor) if f is not None), default=None),
                       suggest=suggest or None,
                       rule=self.rule if self.rel_residual_max >= other.rel_residual_max else other.rule)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge_diagnostics(*records: Mapping[Damping, Convergence]) -> dict[Damping, Convergence]:
    """Per damping, the merge (worst residual, all converged) of several diagnostics records."""
    out: dict[Damping, Convergence] = {}
    for rec in records:
        for d, c in rec.items():
            out[d] = out[d].merge(c) if d in out else c
    return out


def diagnostics_json(record: Mapping[Damping, Convergence]) -> dict[str, dict[str, Any]]:
    """A diagnostics record as JSON-able ``{damping label: fields}``."""
    return {damping_label(d): c.as_dict() for d, c in record.items()}


def diagnostics_from_json(blob: Mapping[str, Mapping[str, Any]], dampings: Sequence[Damping]
                          ) -> dict[Damping, Convergence]:
    """The inverse of :func:`diagnostics_json` for the given dampings (labels not among them are dropped)."""
    return {d: Convergence(**blob[damping_label(d)]) for d in dampings if damping_label(d) in blob}


def needs_parameter_space(solver: Solver, stage: str, why: str) -> None:
    """The one-line refusal (exit 2) of a solver whose vectors are not parameter-space gradients (``vectors``) by
    a stage that needs them (``why``: what the stage does with them)."""
    if solver.vectors is not None:
        raise ConfigError(f"solver={solver.name} is invalid for stage {stage}: its vectors are {solver.vectors}, not "
                          f"the parameters' gradients, so it has no {why}; use a curvature solver there, e.g. "
                          f"solver=ekfac (or kfac, cg, lissa, exact)")


class Solver(ABC):
    """Inverse damped curvature on a model's tracked parameters. Subclass, set ``name``, implement
    :meth:`fit` and :meth:`precondition`; add ``conf/solver/<name>.yaml`` with ``_target_`` to it."""

    name: ClassVar[str] = "solver"
    curvatures: ClassVar[tuple[str, ...]] = ("fisher", "empirical_fisher")
    #: whether :meth:`fit` is independent of the damping (so one fit serves a whole damping list)
    damping_free_fit: ClassVar[bool] = True
    #: iterative solvers: the config key that buys more iterations (named when a result is unconverged)
    iteration_key: ClassVar[str | None] = None
    #: what :meth:`train_grads` returns and :meth:`precondition` acts on, when not the tracked parameters' flat
    #: gradients (``P`` wide): then a preconditioned vector is no parameter step and no IHVP to compare, and the
    #: stages that need one refuse the solver (:func:`needs_parameter_space`)
    vectors: ClassVar[str | None] = None

    def __init__(self, damping: Any = 1e-3, curvature: str = "fisher", modules: str | Sequence[str] = "all",
                 dtype: str = "float32", batch_size: int = 128, device: str = "cpu", seed: int = 0,
                 autocast: str | None = None, task: Task | str | None = None):
        self.task = resolve_task(task)
        self.dampings: list[Damping] = parse_dampings(damping)
        check(curvature in self.curvatures, "solver.curvature", curvature,
              f"solver {self.name} supports {', '.join(self.curvatures)}")
        check(dtype in DTYPES, "solver.dtype", dtype, f"use one of {', '.join(DTYPES)}")
        check(autocast is None or autocast in AUTOCAST, "solver.autocast", autocast,
              f"use null or one of {', '.join(AUTOCAST)}")
        check(autocast is None or dtype == "float32", "solver.autocast", autocast,
              f"needs solver.dtype=float32 (got {dtype}); or set solver.autocast=null")
        self.autocast = autocast
        check(isinstance(batch_size, int) and batch_size >= 1, "solver.batch_size", batch_size, "must be >= 1")
        self.curvature = curvature
        self.modules = modules if isinstance(modules, str) else list(modules)
        self.dtype = DTYPES[dtype]
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.layout: ParamLayout | None = None
        self._snapshots: Snapshots | None = None  # during fit(..., snapshots=...): makes a long fit resumable
        self._mean_eig: float | None = None

    @property
    def label(self) -> str:
        """The solver's name in tables and plots: ``cg``, ``cg+ekfac`` (a preconditioned iterative solver), ..."""
        return self.name

    def components(self) -> list[Solver]:
        """Other solvers this one needs fitted on the same model and data first (an iterative solver's
        preconditioner); :meth:`~influencelab.artifacts.Artifacts.fit` fits or loads them under their own keys."""
        return []

    # -- lifecycle --------------------------------------------------------------------------------
    def setup(self, model: nn.Module) -> ParamLayout:
        """Resolve the tracked modules of ``model`` (logs the untracked parameters once)."""
        self.layout = ParamLayout(model, self.modules)
        self.layout.log_untracked()
        return self.layout

    @abstractmethod
    def fit(self, model: nn.Module, data: LabeledData, snapshots: Snapshots | None = None) -> None:
        """Compute the solver's state from the training data (``setup`` is called first if needed).
        ``snapshots``: where a long fit saves its running sums and resumes from (optional)."""

    @abstractmethod
    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        """``(G + λI)^-1 v`` for flat vectors ``v`` of shape ``[k, P]`` (many at once)."""

    # -- damping ------------------------------------------------------------------------------------
    def mean_eigenvalue(self) -> float:
        """``trace(G) / P`` of the solver's curvature (for ``damping="auto"``)."""
        raise ConfigError(f"solver.damping=auto is invalid for solver {self.name}: give a number")

    def resolve_damping(self, damping: Damping) -> float:
        """The number ``λ`` a damping stands for: itself, or for ``"auto"`` 0.1 x the mean eigenvalue of ``G``."""
        if damping != "auto":
            return float(damping)
        if self._mean_eig is None:
            self._mean_eig = float(self.mean_eigenvalue())
        return AUTO_FRACTION * self._mean_eig

    def precondition_(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        """:meth:`precondition` into ``v`` itself (returned), for a caller that no longer needs ``v``: for a big model
        ``k x P`` is gigabytes. Solvers whose inverse works block by block (EK-FAC, K-FAC) do it without a copy."""
        return v.copy_(self.precondition(v, damping))

    def precondition_all(self, v: torch.Tensor, dampings: Sequence[Damping]) -> torch.Tensor:
        """``[len(dampings), k, P]``: :meth:`precondition` for every damping (solvers may do them jointly)."""
        if len(dampings) == 1:  # a view, not a stacked copy (for big models k x P is gigabytes)
            return self.precondition(v, dampings[0]).unsqueeze(0)
        return torch.stack([self.precondition(v, d) for d in dampings])

    # -- convergence (iterative solvers record it, see .iterative; direct solvers have none) ------------------
    def diagnostics(self) -> dict[Damping, Convergence]:
        """Per damping, how converged the results of :meth:`precondition` / :meth:`precondition_all` since the
        last :meth:`reset_diagnostics` are (worst over every vector and call); ``{}`` for direct solvers."""
        return {}

    def reset_diagnostics(self) -> None:
        """Start a new convergence record (nothing to do for a direct solver)."""
        return None

    def set_diagnostics(self, record: Mapping[Damping, Convergence]) -> None:
        """Replace the record (e.g. with the merge of cached score chunks' records); a direct solver has none."""
        return None

    # -- resumable fitting: a pass over the data snapshots its running sums (see cache.Snapshots) -----
    def _resume(self, phase: str, sums: dict[str, torch.Tensor], gen: torch.Generator | None) -> int:
        """Restore ``sums`` (in place) and ``gen`` from the last snapshot of ``phase``; batches already done."""
        snap = self._snapshots.load(phase) if self._snapshots is not None else None
        if snap is None:
            return 0
        done, tensors = snap
        for k, t in sums.items():
            t.copy_(tensors[k])
        if gen is not None:
            gen.set_state(tensors["_generator"])
        log.info("resuming %s %s from batch %d (snapshot)", self.name, phase, done)
        return done

    def _snapshot(self, phase: str, done: int, sums: dict[str, torch.Tensor], gen: torch.Generator | None,
                  final: bool = False) -> None:
        """Snapshot ``sums`` and ``gen`` after ``done`` batches of ``phase`` (throttled unless ``final``)."""
        if self._snapshots is not None:
            extra = {"_generator": gen.get_state()} if gen is not None else {}
            self._snapshots.save(phase, done, {**sums, **extra}, final)

    # -- caching ----------------------------------------------------------------------------------
    def for_member(self, index: int) -> None:
        """Called once when this solver joins an ensemble as its model number ``index`` (0 for the first): a solver
        whose fit draws randomness that must be independent across the ensemble's models (TRAK's projection)
        makes it so here; the others keep one configuration for all members."""
        return None

    def fit_config(self) -> dict[str, Any]:
        """Everything the fitted state depends on (not the damping when ``damping_free_fit``)."""
        cfg = {k: v for k, v in vars(self).items()
               if k not in ("layout", "device", "dampings", "task") and not k.startswith("_")
               and not isinstance(v, (torch.Tensor, nn.Module, dict))}
        cfg["dtype"] = str(self.dtype)
        if type(self.task) is not ClassificationTask:  # (the CLI's cross-entropy keeps its existing keys)
            cfg["task"] = self.task.key()
        cfg["solver"] = self.name
        if not self.damping_free_fit:
            cfg["dampings"] = self.dampings
        return cfg

    def solve_config(self) -> dict[str, Any]:
        """What a solve depends on beyond the fit and the damping (empty for most solvers; keys of cached solves)."""
        return {}

    # -- ensembles ------------------------------------------------------------------------------------------------
    #: whether the scores carry per-training-point weights that an ensemble averages apart from them (TRAK's
    #: ``1 - p``; ``False``: a model's scores are complete on their own, as for every influence-function solver)
    has_train_weights = False

    def defer_weights(self, on: bool) -> None:
        """Leave the per-training-point weights out of this solver's scores (``on``) so that an ensemble applies
        their mean over its models to the mean of their scores (TRAK's estimator, see :meth:`train_weights`)."""
        return None

    def train_weights(self, model: nn.Module, data: Any) -> torch.Tensor:
        """The weights :meth:`defer_weights` leaves out, ``[n_train]`` over ``data``'s training points."""
        raise NotImplementedError(f"{self.name} has no per-training-point weights")

    def score_config(self) -> dict[str, Any]:
        """What this solver's scores depend on beyond the fit, the damping and the data (part of their cache key
        when not empty; e.g. weights deferred to an ensemble)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted tensors to cache (empty for solvers with nothing to fit)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (``setup`` must have been called)."""
        return None

    def bind(self, model: nn.Module, data: LabeledData) -> None:
        """Attach the model and training data after a cached state was loaded (solvers that compute
        curvature products at precondition time, the iterative ones, need them; others ignore this)."""
        return None

    # -- scoring (defaults use torch.func per-example gradients; solvers may specialise) ------------
    @property
    def store_dtype(self) -> torch.dtype:
        """The dtype gradients and preconditioned queries are kept in (:class:`~.blocks.BlockGradSolver` keeps them
        in bf16 under ``solver.autocast=bf16``); ``solver.dtype`` for every other solver."""
        return self.dtype

    def amp(self) -> torch.autocast:
        """The autocast context of ``solver.autocast`` (disabled when null)."""
        return torch.autocast(self.device.type, dtype=AUTOCAST.get(self.autocast or "bf16"),
                              enabled=self.autocast is not None)

    def train_grads(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Flat per-example loss gradients ``[b, P]`` of a batch (model in eval mode)."""
        return self._grads(model, x, y, self.task.loss)

    def query_grads(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Flat per-example gradients ``[b, P]`` of the task's query measurement (its loss by default)."""
        if self.task.measures_loss:
            return self.train_grads(model, x, y)
        return self._grads(model, x, y, self.task.measurement)

    def _grads(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, fn) -> torch.Tensor:
        from .grads import per_sample_grads

        assert self.layout is not None, "call setup(model) first"
        with self.amp():
            g = per_sample_grads(model, self.layout, batch_to(x, self.device, self.dtype), y.to(self.device), fn,
                                 self.task)
        return g.to(self.dtype)

    def prepare_queries(self, preconditioned: torch.Tensor) -> Any:
        """Preconditioned queries ``[k, P]`` in the form :meth:`pairwise` consumes (once per score pass)."""
        return preconditioned

    def pairwise(self, model: nn.Module, preconditioned: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scores ``[k, b]`` of preconditioned query gradients (``[k, P]`` or :meth:`prepare_queries`'s form)
        against a training batch."""
        return preconditioned @ self.train_grads(model, x, y).T

    def pairwise_fitted(self, preconditioned: Any, positions: torch.Tensor) -> torch.Tensor | None:
        """Scores ``[k, len(positions)]`` against the training points the solver was fitted on, at ``positions`` of
        that data, from what its fit kept (TRAK's projected features), or ``None``: :meth:`pairwise` computes them
        from the batch (every solver that keeps nothing)."""
        return None

    def self_influence(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       dampings: Sequence[Damping]) -> torch.Tensor:
        """``g^T (G + λI)^-1 g`` for each example of a batch and each damping: ``[len(dampings), b]``."""
        g = self.train_grads(model, x, y).to(self.dtype)
        return torch.stack([(self.precondition(g, d) * g).sum(dim=1) for d in dampings])

"""The base of the iterative solvers (CG, LiSSA): they solve ``(G + λI) x = v`` by iterating with exact
curvature-vector products over the training data (:class:`~influencelab.solvers.curvature.Curvature`), instead
of inverting a fitted approximation as the direct solvers do.

What they share lives here:

* the curvature products on the bound model and data (:meth:`IterativeSolver.bind`), and the trace estimate that
  ``damping="auto"`` needs (:meth:`IterativeSolver.mean_eigenvalue`);
* the optional preconditioner ``P^-1`` (``solver.preconditioner``: ``null``, a name of the ``solver`` group such as
  ``ekfac``, or a solver object), composed here with the solver's seed, modules, dtype and curvature and handed,
  built, to a :class:`~influencelab.solvers.preconditioner.Preconditioner`, which applies it row-wise;
* the per-row dampings of the vectors solved together;
* the convergence record per damping (:meth:`IterativeSolver.diagnostics`: :class:`~.base.Convergence`, worst over
  every vector and call since the last reset) and the per-iteration monitor (:meth:`IterativeSolver.set_monitor`);
* where a long solve snapshots its state so that a killed one resumes (:meth:`IterativeSolver.set_resume`).

A subclass sets ``name`` and ``iteration_key`` and implements :meth:`~.base.Solver.precondition` (and, for its
own state, :meth:`~.base.Solver.fit`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .. import distributed
from ..cache import Cache, Snapshots
from ..data.base import LabeledData
from .base import Convergence, Damping, Solver, merge_diagnostics
from .curvature import Curvature
from .preconditioner import Preconditioner, check_spec


class IterativeSolver(Solver):
    """An iterative solver of ``(G + λI) x = v`` with exact curvature products (see the module doc)."""

    curvatures = ("fisher", "empirical_fisher", "hessian")
    iteration_key: ClassVar[str | None] = None

    def __init__(self, *args: Any, preconditioner: Any = None, preconditioner_damping: Any = "same",
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        check_spec(preconditioner, preconditioner_damping)  # (also without one: a bad damping is an error either way)
        # (all private: the fit key has the preconditioner's own entry, see fit_config)
        self._pre_spec = preconditioner
        self._pre_damping = preconditioner_damping
        self._pre: Preconditioner | None = None  # built on first use from a name (see _preconditioner)
        self._curv: Curvature | None = None
        self._data: LabeledData | None = None
        self._convergence: dict[Damping, Convergence] = {}
        self._monitor: Callable[[Damping, int, torch.Tensor], None] | None = None
        self._resume_at: tuple[Cache, str, float] | None = None  # (cache, fit key, seconds between snapshots)

    # -- curvature products ------------------------------------------------------------------------------
    def bind(self, model: nn.Module, data: LabeledData, jacobian_cache_bytes: float = 0) -> None:
        """Keep ``model`` and ``data`` for the curvature products (``setup`` first if needed)."""
        layout = self.layout or self.setup(model)
        self._curv = Curvature(model, layout, self.curvature, self.task, jacobian_cache_bytes=jacobian_cache_bytes)
        self._data = data

    def mean_eigenvalue(self) -> float:
        """``trace(G) / P`` by a seeded trace estimate over the bound data (for ``damping="auto"``)."""
        assert self._curv is not None and self._data is not None and self.layout is not None, "fit the solver first"
        return self._curv.trace_estimate(self._data, self.batch_size, seed=self.seed) / self.layout.size

    @staticmethod
    def row_dampings(lams: Sequence[float], k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``[len(lams) * k, 1]``: each λ repeated for its ``k`` rows (damping-major), the per-row dampings of
        several dampings' vectors solved together."""
        return torch.tensor(list(lams), dtype=dtype, device=device).repeat_interleave(k)[:, None]

    # -- the preconditioner ------------------------------------------------------------------------------
    @property
    def preconditioned(self) -> bool:
        return self._pre_spec is not None

    @property
    def preconditioner_name(self) -> str | None:
        """``ekfac``, ``kfac`` or ``None`` (as recorded in :class:`Convergence`)."""
        if self._pre_spec is None:
            return None
        return self._pre_spec if isinstance(self._pre_spec, str) else self._pre_spec.name

    @property
    def preconditioner(self) -> Solver | None:
        """The preconditioning solver (``None`` without one)."""
        pre = self._preconditioner()
        return pre.solver if pre is not None else None

    def _preconditioner(self) -> Preconditioner | None:
        """The :class:`Preconditioner` of ``solver.preconditioner``: a given solver as it is; a name composed from
        the ``solver`` group (:meth:`build_preconditioner`) on first use."""
        if self._pre is None and self._pre_spec is not None:
            spec = self._pre_spec
            solver = self.build_preconditioner(spec) if isinstance(spec, str) else spec
            self._pre = Preconditioner(solver, self._pre_damping)
        return self._pre

    def build_preconditioner(self, name: str) -> Solver:
        """The ``solver`` group's ``name`` with this solver's seed, modules, dtype, device, task and curvature
        (``fisher`` for a Hessian solve: EK-FAC estimates its Gauss-Newton part), so that its fit key is a
        ``solver=<name>`` run's of the same model and that run's cached fit is reused."""
        from ..compose import solver_config

        curvature = self.curvature if self.curvature in ("fisher", "empirical_fisher") else "fisher"
        dtype = {torch.float32: "float32", torch.float64: "float64"}[self.dtype]
        return solver_config(name, {"modules": self.modules, "dtype": dtype, "curvature": curvature},
                             seed=self.seed, device=str(self.device), task=self.task)

    def _precondition_rows(self, r: torch.Tensor, lam_rows: torch.Tensor) -> torch.Tensor:
        """``P^-1 r`` row-wise at the rows' dampings ``lam_rows`` ``[rows, 1]``; ``r`` itself without a
        preconditioner."""
        pre = self._preconditioner()
        return pre.apply(r, lam_rows) if pre is not None else r

    @property
    def label(self) -> str:
        """The solver's name in tables and plots: ``cg``, ``cg+ekfac`` (preconditioned), ..."""
        return self.name if self._pre_spec is None else f"{self.name}+{self.preconditioner_name}"

    def components(self) -> list[Solver]:
        """The preconditioner, fitted (or loaded) first under its own key by
        :meth:`~influencelab.artifacts.Artifacts.fit`."""
        pre = self._preconditioner()
        return [pre.solver] if pre is not None else []

    def fit_config(self) -> dict[str, Any]:
        cfg = super().fit_config()
        pre = self._preconditioner()
        if pre is not None:  # (absent without one: plain CG/LiSSA keep their keys)
            cfg["preconditioner"] = pre.fit_config()
        return cfg

    # -- convergence ---------------------------------------------------------------------------------------
    def set_monitor(self, fn: Callable[[Damping, int, torch.Tensor], None] | None) -> None:
        """Call ``fn(damping, iteration, x)`` after every iteration with the current solution ``x`` ``[k, P]`` of
        that damping (e.g. to record the error against a reference per iteration); ``None`` stops. LiSSA with
        ``repeats > 1`` calls it after each repeat instead, with the average of the repeats done and ``iteration``
        the steps taken in all (repeats done x depth). A monitor with ``state_dict()``/``load_state_dict(state)``
        (tensors) has its state saved with a resumable solve's snapshots and restored on resume, and one with
        ``pause(seconds)`` is told the seconds spent writing them (not solving)."""
        self._monitor = fn

    # -- resumable solves ------------------------------------------------------------------------------------
    def set_resume(self, cache: Cache | None, fit_key: str = "", every_s: float = 30.0) -> None:
        """Let a long solve snapshot its state to ``cache`` at most every ``every_s`` seconds (and more rarely when a
        snapshot is slow to write: see the subclass) and resume a killed solve of the same vectors from its last
        snapshot; ``None``: no snapshots. ``fit_key`` names the model, data and solver config (the fit's cache key);
        each solve adds what it solves (:meth:`_solve_snapshots`). :meth:`~influencelab.artifacts.Artifacts.fit`
        sets it for every cached fit."""
        self._resume_at = None if cache is None else (cache, fit_key, float(every_s))

    def _solve_snapshots(self, V: torch.Tensor, **solve: Any) -> Snapshots | None:
        """The snapshots of one solve: keyed by the fit, the vectors' shape, what ``solve`` names (dampings, scales,
        depth ...) and whether a monitor records it (its rows are part of the state). Not by the vectors' bits: the
        same query gradients recomputed in another process can differ in the last bits (MKL's sums depend on memory
        alignment), so a snapshot stores :meth:`vector_signature` and a resume checks it
        (:meth:`same_vectors`). (Two solves of other vectors of the same shape, model and settings share one
        snapshot: the later overwrites it, and the other one starts again.)"""
        if self._resume_at is None:
            return None
        cache, fit_key, every_s = self._resume_at
        key = cache.key({"fit": fit_key, "solver": self.name, "shape": list(V.shape),
                         "monitored": self._monitor is not None, **solve})
        return Snapshots(cache, f"solve-{key}-r{distributed.rank()}of{distributed.world_size()}", every_s)

    #: entries of each vector a snapshot's signature samples (evenly spaced), beside its norm
    SIGNATURE_SAMPLES = 4096

    @classmethod
    def vector_signature(cls, V: torch.Tensor) -> torch.Tensor:
        """``[k, 1 + m]`` float64: each row's norm and ``m`` evenly spaced entries (what a resume compares)."""
        step = max(1, V.shape[1] // cls.SIGNATURE_SAMPLES)
        return torch.cat([V.double().norm(dim=1, keepdim=True), V[:, ::step].double()], 1).cpu()

    @staticmethod
    def same_vectors(saved: torch.Tensor | None, now: torch.Tensor, rtol: float = 1e-4) -> bool:
        """Whether two :meth:`vector_signature` are of the same vectors up to last-bit differences: norms within
        ``rtol`` and every sampled entry within ``rtol`` of its row's largest."""
        if saved is None or saved.shape != now.shape:
            return False
        norms = (saved[:, 0] - now[:, 0]).abs() <= rtol * now[:, 0].abs()
        scale = now[:, 1:].abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
        return bool(norms.all()) and bool(((saved[:, 1:] - now[:, 1:]).abs() <= rtol * scale).all())

    def diagnostics(self) -> dict[Damping, Convergence]:
        return dict(self._convergence)

    def reset_diagnostics(self) -> None:
        self._convergence = {}

    def set_diagnostics(self, record: Mapping[Damping, Convergence]) -> None:
        self._convergence = dict(record)

    def _record(self, damping: Damping, conv: Convergence) -> None:
        """Merge one call's convergence at ``damping`` into the record (worst residual, all converged)."""
        self._convergence = merge_diagnostics(self._convergence, {damping: conv})

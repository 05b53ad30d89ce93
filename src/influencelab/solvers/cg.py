"""CG: conjugate gradient on ``(G + λI) x = v`` with exact curvature-vector products over the training set
(or a seeded sample of ``max_examples``): the reference for models too large for ``exact``. All query vectors
are solved together (one vmapped product per iteration), each column with its own step sizes. With the ``fisher``
curvature, the per-example output Jacobians of the data are formed once and kept when they fit in
``jacobian_cache_gb`` (``n C P`` numbers), and every product is then two matrix products
(:class:`~influencelab.solvers.curvature.Curvature`).

Every call records its convergence per damping (:meth:`~.iterative.IterativeSolver.diagnostics`): the iterations
run and the true relative residual ``||(G + λI) x - v|| / ||v||`` of each column, recomputed once at the end with
the same full-data (or ``max_examples``) products CG iterates with (not CG's recursive residual, which drifts in
float32); converged = the worst column's residual <= ``max(tol, 100 eps, 10 x floor)``, ``eps`` the machine epsilon
of the products' dtype (the precision a residual can be measured to: 1.2e-5 in float32, 2.2e-14 in float64) and
``floor`` what that dtype can reach on this problem, measured at the solution (:meth:`CG._floor`: the residual's
change when the solution is rounded anew and the product recomputed, i.e. the residual the dtype-rounded exact
solution shows, ``≈ eps ||G + λI|| ||x|| / ||v||`` at worst; it grows as λ falls). The factor 10 allows for CG's own
accumulated rounding: on a digits CNN (13,706 parameters, 500 points, float32, λ = 1e-3) the floor was 2.5e-5, CG
stalled at 3.1e-5 and the float32 rounding of the float64 solution itself showed 2.1e-5 -- all above the former
fixed cut of 100 eps = 1.19e-5, which thus rejected a solution as good as float32 allows. The cut, the floor and
the rule in words are recorded (``tol``, ``floor``, ``rule`` of :class:`~.base.Convergence`; ``solver/floor@λ``,
``solver/rule@λ``), and logged when the floor decided.

Preconditioned (``preconditioner: ekfac | kfac``): PCG with ``P^-1`` the fitted EK-FAC/K-FAC inverse at
``preconditioner_damping`` (:mod:`~influencelab.solvers.preconditioner`), the same damped system and the same
stopping rule on the unpreconditioned residual ``||r|| <= max(tol, 100 eps) ||v||``; when the true residual then misses ``tol``
(the recursive one drifts), CG restarts from the true residual (at most three times). The iterations needed fall
as ``P^-1 (G + λI)`` is better conditioned or more clustered than ``G + λI``; not, in general, for a low-rank ``G``
that plain CG resolves in about rank-many iterations (``experiments/precond_spectrum.py``)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from torch import nn

from ..data.base import LabeledData
from ..errors import SolverDivergedError, check
from ..progress import progress
from .base import Convergence, Damping
from .iterative import IterativeSolver

log = logging.getLogger(__name__)


class CG(IterativeSolver):
    name = "cg"
    iteration_key = "max_iter"
    #: converged at a relative residual up to this many times the problem's measured float floor (:meth:`_floor`)
    FLOOR_FACTOR = 10.0

    def __init__(self, *args: Any, tol: float = 1e-8, max_iter: int = 500, max_examples: int | None = None,
                 preconditioner: Any = None, preconditioner_damping: Any = "same", jacobian_cache_gb: float = 4.0,
                 **kwargs: Any):
        super().__init__(*args, preconditioner=preconditioner, preconditioner_damping=preconditioner_damping,
                         **kwargs)
        check(tol > 0, "solver.tol", tol, "must be > 0")
        check(max_iter >= 1, "solver.max_iter", max_iter, "must be >= 1")
        check(max_examples is None or max_examples >= 1, "solver.max_examples", max_examples, "must be >= 1 or null")
        check(jacobian_cache_gb >= 0, "solver.jacobian_cache_gb", jacobian_cache_gb, "must be >= 0 (0: no cache)")
        self.tol, self.max_iter, self.max_examples = tol, max_iter, max_examples
        self._jacobian_cache_gb = jacobian_cache_gb  # (not in fit_config: it changes the speed, not the result)
        self._n_train = 0

    def fit(self, model: nn.Module, data: LabeledData, snapshots=None) -> None:
        """Nothing to precompute: keeps the model and (a sample of) the data for the products."""
        self.bind(model, data)

    def bind(self, model: nn.Module, data: LabeledData, jacobian_cache_bytes: float | None = None) -> None:
        """The products over the training set, or over its seeded sample of ``max_examples`` points, with the
        output Jacobians kept when they fit in ``jacobian_cache_gb``."""
        self._n_train = len(data)
        if self.max_examples is not None and self.max_examples < len(data):
            g = torch.Generator().manual_seed(self.seed)
            data = data.subset(torch.randperm(len(data), generator=g)[: self.max_examples].sort().values)
        super().bind(model, data, self._jacobian_cache_gb * 2**30 if jacobian_cache_bytes is None
                     else jacobian_cache_bytes)

    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        assert self._curv is not None and self._data is not None, "fit the solver first"
        lam = self.resolve_damping(damping)
        t0 = time.perf_counter()
        b = v.to(self._curv.dtype)
        lam_rows = self.row_dampings([lam], len(b), b.dtype, b.device)

        def M(r: torch.Tensor) -> torch.Tensor:
            return self._precondition_rows(r, lam_rows)

        x = torch.zeros_like(b)
        r = b.clone()
        bn = b.norm(dim=1)
        # stop on the (unpreconditioned) residual norm at tol, but not below what the products' dtype can measure:
        # below it the recursive residual is rounding noise, and iterating on never lowers the true residual (it
        # ran PCG to max_iter at tol=1e-6 in float32)
        tol = self._effective_tol(b.dtype)
        target = tol * bn
        iterations, restarts, measure_s = 0, 0, 0.0
        bar = progress(None, desc=f"{self.label} at damping {lam:g}", unit="iter")  # off a terminal: a line per 30 s
        while True:
            z = M(r)
            p, rz = z.clone(), (r * z).sum(1)
            while iterations < self.max_iter:
                active = r.norm(dim=1) > target
                if not active.any():
                    break
                iterations += 1
                bar.update()
                Ap = self._curv.mean_product(p, self._data, self.batch_size) + lam * p
                pAp = (p * Ap).sum(1)
                if not torch.isfinite(pAp).all() or (pAp[active] <= 0).any():
                    raise SolverDivergedError(
                        f"CG broke down at iteration {iterations} (curvature not positive definite along a search "
                        f"direction); increase solver.damping (now {lam:g})")
                alpha = torch.where(active, rz / pAp.clamp_min(1e-300), torch.zeros_like(rz))
                x += alpha[:, None] * p
                r -= alpha[:, None] * Ap
                z = M(r)
                rz_new = (r * z).sum(1)
                beta = torch.where(active, rz_new / rz.where(rz != 0, torch.ones_like(rz)), torch.zeros_like(rz))
                p = z + beta[:, None] * p
                rz = rz_new
                if self._monitor is not None:
                    self._monitor(damping, iterations, x)
            conv = self._convergence_of(x, b, lam, iterations)
            measure_s += conv.measure_s
            # the recursive residual drifts from the true one in float32: restart from the true residual
            if conv.converged or iterations >= self.max_iter or restarts >= 3:
                break
            restarts += 1
            r = b - (self._curv.mean_product(x, self._data, self.batch_size) + lam * x)
            target = torch.minimum(target, 0.5 * tol * bn)
        bar.close()
        conv = dataclasses.replace(conv, measure_s=measure_s, solve_s=time.perf_counter() - t0 - measure_s,
                                   preconditioner=self.preconditioner_name)
        self._record(damping, conv)
        if not conv.converged:
            log.warning("%s did not reach tol=%g in %d iterations (worst relative residual %.2e; %s); raise "
                        "solver.max_iter or solver.damping", self.label.upper(), conv.tol, iterations,
                        conv.rel_residual_max, conv.rule)
        elif conv.rel_residual_max > self._effective_tol(b.dtype):  # the problem's float floor decided: say so
            log.info("%s at damping %g: relative residual %.2e accepted (%s)", self.label.upper(), lam,
                     conv.rel_residual_max, conv.rule)
        return x.to(v.dtype)

    def _effective_tol(self, dtype: torch.dtype) -> float:
        """``max(tol, 100 eps)``: the smallest relative residual the products' dtype can measure (1.2e-5 in
        float32, 2.2e-14 in float64); CG's recursion stops there (acceptance also allows for the problem's own
        float floor, see :meth:`_convergence_of`)."""
        return max(self.tol, 100 * torch.finfo(dtype).eps)

    def _convergence_of(self, x: torch.Tensor, b: torch.Tensor, lam: float, iterations: int) -> Convergence:
        """The true relative residuals ``||(G + λI) x - b|| / ||b||`` and the problem's float floor (two more
        products over the data). Converged: the worst residual is at most ``max(tol, 100 eps, FLOOR_FACTOR x
        floor)`` (the cut, recorded as ``tol``, with the rule in words)."""
        assert self._curv is not None and self._data is not None
        t0 = time.perf_counter()
        Ax = self._curv.mean_product(x, self._data, self.batch_size) + lam * x
        r = b - Ax
        bn = b.norm(dim=1)
        rel = torch.where(bn > 0, r.norm(dim=1) / bn.clamp_min(1e-300), r.norm(dim=1))
        floor = float(self._floor(x, b, lam, Ax).max())
        eps = torch.finfo(b.dtype).eps
        tol = max(self._effective_tol(b.dtype), self.FLOOR_FACTOR * floor)
        n = len(self._data)
        on = f"all {n} training points" if n == self._n_train else \
            f"the {n} of {self._n_train} training points CG solves with (max_examples)"
        rule = (f"converged when <= max(tol {self.tol:g}, 100 eps {100 * eps:.3g}, {self.FLOOR_FACTOR:g} x the "
                f"{str(b.dtype).removeprefix('torch.')} floor {floor:.3g}) = {tol:.3g}; floor: the residual's change "
                f"when the solution is rounded anew and the product recomputed")
        return Convergence(lam, iterations, float(rel.max()), float(rel.mean()), tol, bool(rel.max() <= tol),
                           len(b), on, measure_s=time.perf_counter() - t0, floor=floor, rule=rule)

    def _floor(self, x: torch.Tensor, b: torch.Tensor, lam: float, Ax: torch.Tensor) -> torch.Tensor:
        """Per column, the relative residual the products' dtype cannot resolve at this solution: ``||fl(A fl(α x))
        / α - fl(A x)|| / ||b||`` with ``A = G + λI`` and ``α = 4/3`` (not a power of two, so ``α x`` is rounded
        anew: a relative perturbation of each component by up to ``eps / 2``, as storing the exact solution in this
        dtype makes, and the product's rounding falls differently). Mathematically the two products agree; what
        differs is the rounding of the solution and of the product, i.e. the residual a dtype-rounded exact solution
        would show, ``≈ eps ||A|| ||x|| / ||b||`` at worst (it grows with the conditioning). CG's own accumulated
        rounding adds a small multiple of it (:data:`FLOOR_FACTOR`)."""
        assert self._curv is not None and self._data is not None
        a = 4.0 / 3.0
        xa = x * a
        Axa = self._curv.mean_product(xa, self._data, self.batch_size) + lam * xa
        bn = b.norm(dim=1).clamp_min(1e-300)
        return (Axa / a - Ax).norm(dim=1) / bn

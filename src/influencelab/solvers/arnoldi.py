"""Arnoldi (Schioppa et al. 2022, "Scaling up influence functions"): the top-k eigenpairs of the curvature ``G``
from a Krylov subspace, and the inverse on them.

Fitting runs ``n_iters`` steps of the Arnoldi iteration from a seeded random start vector, with exact
curvature-vector products ``G q`` over the training data (:class:`~.curvature.Curvature`; ``fisher`` products go
through the per-example output Jacobians when they fit in ``jacobian_cache_gb``, as for CG). ``G`` is symmetric, so
this is the Lanczos iteration; every new vector is reorthogonalised against the whole basis (classical Gram-Schmidt
twice), so the basis stays orthonormal to working precision and no spurious copies of converged eigenvalues
appear. When the Krylov subspace becomes invariant (``G`` of rank r is exhausted after about r + 1 steps) the
iteration restarts from a fresh seeded vector orthogonal to the basis. The projected matrix ``T = Q^T G Q``
(``n_iters x n_iters``, float64) is decomposed with ``torch.linalg.eigh``; the ``top_k`` Ritz pairs of largest
``|s|`` are kept ("distilled"): eigenvalues ``s [k]`` and orthonormal eigenvectors ``U [k, P]``.

The inverse, for every damping λ from the one fit (``complement``):

* ``drop`` (default; the paper's, and dattri's ``ihvp_arnoldi``): ``U diag(1/(s + λ)) U^T v``, i.e. influence
  restricted to the top-k subspace (the part of ``v`` outside it is discarded);
* ``damping``: ``U diag(1/(s + λ)) U^T v + (v - U U^T v) / λ``, i.e. ``G`` taken as 0 outside the subspace. Exact
  when the subspace holds the whole range of ``G`` (``top_k >= rank G``), and then equal to the dense solve.

``damping="auto"``: 0.1 x ``trace(G) / P`` by the same seeded Hutchinson estimate as CG and LiSSA (not the sum of
the kept eigenvalues, which misses the rest of the spectrum).

Cost: ``n_iters`` products over the training data (one vector each) and ``O(n_iters^2 P)`` for the
reorthogonalisation. Memory: the basis, ``n_iters x P`` numbers in ``solver.dtype`` (ResNet-18's 11.2M parameters,
float32: 45 MB per iteration, 9 GB at 200), then ``top_k x P`` for the kept eigenvectors (cached).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data.base import LabeledData
from ..errors import ConfigError, SolverDivergedError, check
from ..progress import progress
from .base import Damping, Solver
from .curvature import Curvature

log = logging.getLogger(__name__)

COMPLEMENTS = ("drop", "damping")


class Arnoldi(Solver):
    """Top-k eigenpairs of ``G`` by the Arnoldi (Lanczos) iteration; the inverse on that subspace (module doc)."""

    name = "arnoldi"
    curvatures = ("fisher", "empirical_fisher", "hessian")

    def __init__(self, *args: Any, top_k: int = 50, n_iters: int | None = None, complement: str = "drop",
                 jacobian_cache_gb: float = 4.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        check(isinstance(top_k, int) and top_k >= 1, "solver.top_k", top_k, "must be an integer >= 1")
        check(n_iters is None or (isinstance(n_iters, int) and n_iters >= top_k), "solver.n_iters", n_iters,
              f"must be an integer >= solver.top_k={top_k}, or null (2 x top_k)")
        check(complement in COMPLEMENTS, "solver.complement", complement, f"use one of {', '.join(COMPLEMENTS)}")
        check(jacobian_cache_gb >= 0, "solver.jacobian_cache_gb", jacobian_cache_gb, "must be >= 0 (0: no cache)")
        if complement == "damping" and any(d == 0 for d in self.dampings):
            raise ConfigError("solver.damping=0 is invalid for solver=arnoldi with solver.complement=damping (the "
                              "complement is scaled by 1/damping): give a damping > 0 or set solver.complement=drop")
        self.top_k = top_k
        self.n_iters = n_iters if n_iters is not None else 2 * top_k  # resolved: null and 2k share a fit key
        self.complement = complement  # (in the fit key: the score caches derive their keys from it)
        self._jacobian_cache_gb = jacobian_cache_gb  # (not in fit_config: it changes the speed, not the result)
        # the fit (a dict: never part of fit_config, fitted or not): eigenvalues [k] float64 by |s| descending,
        # eigenvectors [k, P] in self.dtype (orthonormal rows), ritz_residuals [k] ||G u - s u|| (float64)
        self.state: dict[str, torch.Tensor] = {}
        self._curv: Curvature | None = None
        self._data: LabeledData | None = None

    @property
    def eigenvalues(self) -> torch.Tensor | None:
        return self.state.get("eigenvalues")

    @property
    def eigenvectors(self) -> torch.Tensor | None:
        return self.state.get("eigenvectors")

    @property
    def ritz_residuals(self) -> torch.Tensor | None:
        return self.state.get("ritz_residuals")

    # -- fitting ----------------------------------------------------------------------------------------------
    def fit(self, model: nn.Module, data: LabeledData, snapshots=None) -> None:
        if self.layout is None:
            self.setup(model)
        t0 = time.perf_counter()
        T, Q, beta = self._krylov(model, data)
        evals, evecs = torch.linalg.eigh(T)
        k = min(self.top_k, len(evals))
        order = evals.abs().argsort(descending=True, stable=True)[:k]
        # Lanczos' residual of each Ritz pair: ||G u - s u|| = |beta_m| |last component of its eigenvector of T|
        self.state = {"eigenvalues": evals[order].to(self.device),
                      "eigenvectors": evecs[:, order].T.to(Q.device, Q.dtype) @ Q,
                      "ritz_residuals": (beta * evecs[-1, order].abs()).to(self.device)}
        del Q
        self._mean_eig = None
        self.bind(model, data)
        scale = float(self.eigenvalues.abs().max()) if k else 0.0
        log.info("arnoldi fit: %d iterations, top %d eigenvalues %.3g .. %.3g, worst Ritz residual %.2e "
                 "(relative to the top eigenvalue), %.1fs", len(T), k, float(self.eigenvalues[0]),
                 float(self.eigenvalues[-1]), float(self.ritz_residuals.max()) / max(scale, 1e-300),
                 time.perf_counter() - t0)

    def _krylov(self, model: nn.Module, data: LabeledData) -> tuple[torch.Tensor, torch.Tensor, float]:
        """:meth:`_arnoldi` with the curvature products over ``data`` (their Jacobian cache freed on return)."""
        assert self.layout is not None
        curv = Curvature(model, self.layout, self.curvature, self.task,
                         jacobian_cache_bytes=self._jacobian_cache_gb * 2**30)
        return self._arnoldi(lambda V: curv.mean_product(V, data, self.batch_size), self.layout.size)

    def _arnoldi(self, matvec, P: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(T [m, m] float64, Q [m, P], beta)``: ``m = min(n_iters, P)`` steps of Arnoldi with full
        reorthogonalisation from a seeded start; ``T = Q^T G Q`` (symmetrised) and ``beta`` the norm of the
        last residual vector (for the Ritz residuals)."""
        m = min(self.n_iters, P)
        gen = torch.Generator().manual_seed(self.seed)
        Q = torch.empty(m, P, dtype=self.dtype, device=self.device)
        H = torch.zeros(m, m, dtype=torch.float64)
        eps = torch.finfo(self.dtype).eps
        Q[0] = self._random_unit(P, gen, Q[:0])
        beta, scale, restarts = 0.0, 0.0, 0
        for j in progress(range(m), desc="arnoldi iterations"):
            w = matvec(Q[j:j + 1]).to(self.dtype)[0]
            h = self._orthogonalise(w, Q[: j + 1])
            H[: j + 1, j] = h.double().cpu()
            beta = float(w.norm())
            scale = max(scale, float(h.abs().max()))
            if j + 1 == m:
                break
            if beta <= 100 * eps * max(scale, 1e-300):  # the Krylov subspace is invariant: restart orthogonally
                restarts += 1
                Q[j + 1] = self._random_unit(P, gen, Q[: j + 1])
            else:
                H[j + 1, j] = beta
                Q[j + 1] = w / beta
        if restarts:
            log.info("arnoldi: the Krylov subspace became invariant %d time(s) (G of low rank); restarted "
                     "orthogonally", restarts)
        return (H + H.T) / 2, Q, beta

    def _random_unit(self, P: int, gen: torch.Generator, basis: torch.Tensor) -> torch.Tensor:
        """A seeded random unit vector orthogonal to the rows of ``basis``."""
        q = torch.randn(P, generator=gen, dtype=torch.float64).to(self.device, self.dtype)
        self._orthogonalise(q, basis)
        return q / q.norm()

    @staticmethod
    def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """Remove from ``w`` (in place) its components along the orthonormal rows of ``basis`` by classical
        Gram-Schmidt twice ("twice is enough": orthogonal to working precision); returns the coefficients."""
        if len(basis) == 0:
            return w.new_zeros(0)
        h = basis @ w
        w -= h @ basis
        h2 = basis @ w
        w -= h2 @ basis
        return h + h2

    def bind(self, model: nn.Module, data: LabeledData) -> None:
        """Keep the model and data for the trace estimate of ``damping="auto"`` (products, no Jacobian cache)."""
        layout = self.layout or self.setup(model)
        self._curv = Curvature(model, layout, self.curvature, self.task)
        self._data = data

    # -- applying the inverse -----------------------------------------------------------------------------------
    def mean_eigenvalue(self) -> float:
        """``trace(G) / P`` by the seeded Hutchinson estimate CG and LiSSA use (for ``damping="auto"``)."""
        assert self._curv is not None and self._data is not None and self.layout is not None, "fit the solver first"
        return self._curv.trace_estimate(self._data, self.batch_size, seed=self.seed) / self.layout.size

    def _inverse_eigenvalues(self, damping: Damping) -> tuple[float, torch.Tensor]:
        assert self.eigenvalues is not None, "fit the solver first"
        lam = self.resolve_damping(damping)
        s = self.eigenvalues
        if self.complement == "damping" and lam <= 0:
            raise ConfigError(f"solver.damping={damping!r} (= {lam:g}) is invalid with solver.complement=damping: "
                              f"give a damping > 0 or set solver.complement=drop")
        if len(s) and float((s + lam).min()) <= 0:
            raise SolverDivergedError(f"G + {lam:g} I is not positive definite on the top-{len(s)} subspace "
                                      f"(smallest kept eigenvalue {float(s.min()):.3g}); increase solver.damping")
        return lam, 1.0 / (s + lam)

    def _project(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v [b, P] in the basis' dtype, U v [b, k])``."""
        assert self.eigenvectors is not None, "fit the solver first"
        U = self.eigenvectors
        v = v.to(U.dtype)
        return v, v @ U.T

    def _apply(self, c: torch.Tensor, rest: torch.Tensor | None, damping: Damping) -> torch.Tensor:
        """``U^T diag(1/(s + λ)) c`` (``+ rest / λ`` with ``complement=damping``) for the projections ``c``."""
        lam, inv = self._inverse_eigenvalues(damping)
        out = (c.double() * inv).to(c.dtype) @ self.eigenvectors
        if self.complement == "damping":
            out += rest / lam
        return out

    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        return self.precondition_all(v, [damping])[0]

    def precondition_all(self, v: torch.Tensor, dampings: Sequence[Damping]) -> torch.Tensor:
        """Every damping from one projection ``U v`` (and one complement ``v - U^T U v``)."""
        w, c = self._project(v)
        rest = w - c @ self.eigenvectors if self.complement == "damping" else None
        if len(dampings) == 1:  # (no stacked copy)
            return self._apply(c, rest, dampings[0]).to(v.dtype).unsqueeze(0)
        return torch.stack([self._apply(c, rest, d) for d in dampings]).to(v.dtype)

    def self_influence(self, model: nn.Module, x: Any, y: torch.Tensor,
                       dampings: Sequence[Damping]) -> torch.Tensor:
        """``sum_i (u_i^T g)^2 / (s_i + λ)`` (``+ ||g - U^T U g||^2 / λ`` with ``complement=damping``): no
        ``[b, P]`` vector per damping."""
        g, c = self._project(self.train_grads(model, x, y))
        sq = c.double().square()
        rest = (g - c @ self.eigenvectors).double().square().sum(1) if self.complement == "damping" else None
        out = []
        for d in dampings:
            lam, inv = self._inverse_eigenvalues(d)
            s = sq @ inv
            out.append(s + rest / lam if rest is not None else s)
        return torch.stack(out).to(self.dtype)

    # -- caching --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self.state, "fit the solver first"
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {"eigenvalues": state["eigenvalues"].to(self.device, torch.float64),
                      "eigenvectors": state["eigenvectors"].to(self.device, self.dtype),
                      "ritz_residuals": state["ritz_residuals"].to(self.device, torch.float64)}
        self._mean_eig = None

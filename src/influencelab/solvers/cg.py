"""CG: conjugate gradient on ``(G + λI) x = v`` with exact curvature-vector products over the training set
(or a seeded sample of ``max_examples``): the reference for models too large for ``exact``. All query vectors
are solved together (one vmapped product per iteration), each column with its own step sizes."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..data.base import LabeledData
from ..errors import SolverDivergedError, check
from .base import Damping, Solver
from .curvature import Curvature

log = logging.getLogger(__name__)


class CG(Solver):
    name = "cg"
    curvatures = ("fisher", "empirical_fisher", "hessian")

    def __init__(self, *args: Any, tol: float = 1e-8, max_iter: int = 500, max_examples: int | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        check(tol > 0, "solver.tol", tol, "must be > 0")
        check(max_iter >= 1, "solver.max_iter", max_iter, "must be >= 1")
        check(max_examples is None or max_examples >= 1, "solver.max_examples", max_examples, "must be >= 1 or null")
        self.tol, self.max_iter, self.max_examples = tol, max_iter, max_examples
        self._curv: Curvature | None = None
        self._data: LabeledData | None = None

    def fit(self, model: nn.Module, data: LabeledData, snapshots=None) -> None:
        """Nothing to precompute: keeps the model and (a sample of) the data for the products."""
        self.bind(model, data)

    def bind(self, model: nn.Module, data: LabeledData) -> None:
        layout = self.layout or self.setup(model)
        if self.max_examples is not None and self.max_examples < len(data):
            g = torch.Generator().manual_seed(self.seed)
            data = data.subset(torch.randperm(len(data), generator=g)[: self.max_examples].sort().values)
        self._curv, self._data = Curvature(model, layout, self.curvature, self.task), data

    def mean_eigenvalue(self) -> float:
        assert self._curv is not None and self._data is not None and self.layout is not None, "fit the solver first"
        return self._curv.trace_estimate(self._data, self.batch_size, seed=self.seed) / self.layout.size

    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        assert self._curv is not None and self._data is not None, "fit the solver first"
        lam = self.resolve_damping(damping)
        b = v.to(self._curv.dtype)
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        target = (self.tol * b.norm(dim=1)) ** 2
        for it in range(self.max_iter):
            active = rs > target
            if not active.any():
                break
            Ap = self._curv.mean_product(p, self._data, self.batch_size) + lam * p
            pAp = (p * Ap).sum(1)
            if not torch.isfinite(pAp).all() or (pAp[active] <= 0).any():
                raise SolverDivergedError(f"CG broke down at iteration {it} (curvature not positive definite "
                                          f"along a search direction); increase solver.damping (now {lam:g})")
            alpha = torch.where(active, rs / pAp.clamp_min(1e-300), torch.zeros_like(rs))
            x += alpha[:, None] * p
            r -= alpha[:, None] * Ap
            rs_new = (r * r).sum(1)
            beta = torch.where(active, rs_new / rs.clamp_min(1e-300), torch.zeros_like(rs))
            p = r + beta[:, None] * p
            rs = rs_new
        else:
            rel = (rs.sqrt() / b.norm(dim=1).clamp_min(1e-300)).max().item()
            log.warning("CG did not reach tol=%g in %d iterations (worst relative residual %.2e); raise "
                        "solver.max_iter or solver.damping", self.tol, self.max_iter, rel)
        return x.to(v.dtype)

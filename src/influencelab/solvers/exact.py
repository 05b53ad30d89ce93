"""Exact: the dense damped curvature ``(G + λI)^-1`` for tiny models — the ground truth the others are checked
against. One eigendecomposition (float64) serves every damping. Refuses models with more than ``max_params``
tracked parameters (a P x P float64 matrix: 10,000 params = 800 MB)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.base import LabeledData
from ..errors import ConfigError
from .base import Damping, Solver
from .curvature import Curvature


class Exact(Solver):
    name = "exact"
    curvatures = ("fisher", "empirical_fisher", "hessian")

    def __init__(self, *args: Any, max_params: int = 10_000, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_params = max_params
        self.evals: torch.Tensor | None = None
        self.evecs: torch.Tensor | None = None

    def setup(self, model: nn.Module):
        layout = super().setup(model)
        if layout.size > self.max_params:
            raise ConfigError(f"solver=exact on {layout.size:,} tracked parameters is invalid: the dense matrix "
                              f"allows at most solver.max_params={self.max_params:,}; track fewer "
                              f"(solver.modules=last:1) or use solver=cg")
        return layout

    def fit(self, model: nn.Module, data: LabeledData, snapshots=None) -> None:
        layout = self.layout or self.setup(model)
        G = Curvature(model, layout, self.curvature, self.task).dense_mean(data, self.batch_size)
        self.evals, self.evecs = torch.linalg.eigh((G + G.T) / 2)
        self.evecs = self.evecs.contiguous()  # (row-major as the cache reads it back: see EKFAC.fit)

    def dense(self) -> torch.Tensor:
        """The fitted dense curvature ``G`` (float64)."""
        assert self.evecs is not None and self.evals is not None
        return (self.evecs * self.evals) @ self.evecs.T

    def mean_eigenvalue(self) -> float:
        assert self.evals is not None, "fit the solver first"
        return float(self.evals.mean())

    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        assert self.evecs is not None and self.evals is not None, "fit the solver first"
        d = self.resolve_damping(damping)
        if float(self.evals.min()) + d <= 0:
            from ..errors import SolverDivergedError

            raise SolverDivergedError(f"G + {d:g} I is not positive definite (smallest eigenvalue "
                                      f"{float(self.evals.min()):.3g}); increase solver.damping")
        Q = self.evecs
        out = ((v.double() @ Q) / (self.evals + d)) @ Q.T
        return out.to(v.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self.evals is not None and self.evecs is not None
        return {"evals": self.evals, "evecs": self.evecs}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.evals, self.evecs = state["evals"].to(self.device), state["evecs"].to(self.device)
        self._mean_eig = None

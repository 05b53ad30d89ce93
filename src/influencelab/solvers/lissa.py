"""LiSSA (Agarwal et al. 2017): the stochastic Neumann recursion
``h_0 = v,  h_j = v + (I - (G_batch + λI) / s) h_{j-1}``, result ``h_J / s`` (averaged over ``repeats``),
with exact curvature-vector products on a seeded stream of training batches. All query vectors, and all
dampings of a list, iterate together (one vmapped product per step). ``scale="auto"`` sets
``s = 2 * λ_max(G) + λ`` per damping, ``λ_max`` from a few power-iteration steps: the recursion converges when
``s`` exceeds the largest eigenvalue of ``G_batch + λI``; the factor 2 covers a mini-batch's larger top eigenvalue,
and ``+ λ`` the damping, which is exact (without it, any λ above ~3 λ_max diverges). A fixed ``scale`` is used
as given for every damping; divergence (NaN/inf or norm growth) stops with a suggestion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data.base import LabeledData
from ..errors import SolverDivergedError, check
from ..progress import progress
from .base import Damping, Solver
from .curvature import Curvature


class LiSSA(Solver):
    name = "lissa"
    curvatures = ("fisher", "empirical_fisher", "hessian")

    def __init__(self, *args: Any, depth: int = 200, scale: float | str = "auto", repeats: int = 1, **kwargs: Any):
        kwargs.setdefault("batch_size", 32)
        super().__init__(*args, **kwargs)
        check(isinstance(depth, int) and depth >= 1, "solver.depth", depth, "must be an integer >= 1")
        check(isinstance(repeats, int) and repeats >= 1, "solver.repeats", repeats, "must be an integer >= 1")
        check(scale == "auto" or (isinstance(scale, (int, float)) and scale > 0), "solver.scale", scale,
              "must be > 0 or auto")
        self.depth, self.scale, self.repeats = depth, scale, repeats
        self._curv: Curvature | None = None
        self._data: LabeledData | None = None
        self._scale: float | None = None

    def fit(self, model: nn.Module, data: LabeledData, snapshots=None) -> None:
        """Keeps the model and data; estimates ``λ_max`` for ``scale=auto``."""
        self.bind(model, data)
        if self.scale == "auto":
            self._scale = 2.0 * self._top_eigenvalue()
        else:
            self._scale = float(self.scale)

    def _top_eigenvalue(self, iters: int = 20) -> float:
        assert self._curv is not None and self._data is not None and self.layout is not None
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(self._data), generator=g)[: 8 * self.batch_size]
        x, y = self._data.images(idx), self._data.targets[idx]
        v = torch.randn(1, self.layout.size, generator=g).to(self._curv.device, self._curv.dtype)
        lam = 0.0
        for _ in range(iters):
            w = self._curv.product(v / v.norm(), x, y)
            lam = float((w * v / v.norm()).sum())
            v = w
        return max(lam, 1e-12)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(self._scale or 0.0, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._scale = float(state["scale"])

    def bind(self, model: nn.Module, data: LabeledData) -> None:
        layout = self.layout or self.setup(model)
        self._curv, self._data = Curvature(model, layout, self.curvature, self.task), data

    def mean_eigenvalue(self) -> float:
        assert self._curv is not None and self._data is not None and self.layout is not None, "fit the solver first"
        return self._curv.trace_estimate(self._data, self.batch_size, seed=self.seed) / self.layout.size

    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        return self.precondition_all(v, [damping])[0]

    def precondition_all(self, v: torch.Tensor, dampings: Sequence[Damping]) -> torch.Tensor:
        assert self._curv is not None and self._data is not None and self._scale is not None, "fit the solver first"
        k, d = len(v), len(dampings)
        lam = torch.tensor([self.resolve_damping(x) for x in dampings], dtype=self._curv.dtype,
                           device=self._curv.device).repeat_interleave(k)[:, None]
        # per row: s = 2 λ_max + λ (auto) or the fixed scale
        s = lam + self._scale if self.scale == "auto" else torch.full_like(lam, self._scale)
        V = v.to(self._curv.dtype).repeat(d, 1)  # [d*k, P], damping-major
        vnorm = V.norm(dim=1).clamp_min(1e-30)
        total = torch.zeros_like(V)
        for rep in range(self.repeats):
            h = V.clone()
            batches = self._stream(rep)
            for j in progress(range(self.depth), desc="lissa"):
                x, y = next(batches)
                h = V + h - (self._curv.product(h, x, y) + lam * h) / s
                if j % 10 == 9 or j == self.depth - 1:
                    norm = h.norm(dim=1)
                    if not torch.isfinite(norm).all() or (norm > 2 * (j + 2) * vnorm).any():
                        raise SolverDivergedError(
                            f"LiSSA diverged at step {j + 1} (scale {s.max().item():.3g}, damping {dampings}); use "
                            f"a larger solver.scale (e.g. {4 * s.max().item():.3g}) or a larger solver.damping")
            total += h / s
        return (total / self.repeats).reshape(d, k, -1).to(v.dtype)

    def _stream(self, rep: int):
        """An endless seeded stream of training batches (reshuffled each epoch)."""
        assert self._data is not None
        epoch = 0
        while True:
            for x, y, _ in self._data.batches(self.batch_size, shuffle=True, seed=self.seed + 7919 * rep + epoch):
                yield x, y
            epoch += 1

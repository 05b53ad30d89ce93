"""LiSSA (Agarwal et al. 2017): the stochastic Neumann recursion
``h_0 = v,  h_j = v + (I - (G_batch + λI) / s) h_{j-1}``, result ``h_J / s`` (averaged over ``repeats``),
with exact curvature-vector products on a seeded stream of training batches. All query vectors, and all
dampings of a list, iterate together (one vmapped product per step). ``scale="auto"`` sets
``s = 2 * λ_max(G) + λ`` per damping, ``λ_max`` from a few power-iteration steps: the recursion converges when
``s`` exceeds the largest eigenvalue of ``G_batch + λI``; the factor 2 covers a mini-batch's larger top eigenvalue,
and ``+ λ`` the damping, which is exact (without it, any λ above ~3 λ_max diverges). A fixed ``scale`` is used
as given for every damping; divergence (NaN/inf or norm growth) stops with a suggestion.

Preconditioned (``preconditioner: ekfac | kfac``, ASTRA, arXiv 2507.14740): the same recursion written on the
iterate, ``x_0 = P^-1 v / s,  x_j = x_{j-1} + P^-1 (v - (G_batch + λI) x_{j-1}) / s`` (with ``P = I`` it is the
plain one, ``x_j = h_j / s``), ``P^-1`` the fitted EK-FAC/K-FAC inverse at ``preconditioner_damping`` (see
:mod:`~influencelab.solvers.preconditioner`); ``scale="auto"`` then sets ``s = 2 μ_max`` per damping, ``μ_max`` the
top eigenvalue of ``P^-1 (G_S + λI)`` by power iteration on the same seeded sample ``S``. It converges to the same
``(G + λI)^-1 v``, at a rate set by ``μ_min / s``: fast when ``P`` matches ``G`` well, slower than the plain
recursion when ``P^-1 (G + λI)`` is worse conditioned than ``G + λI`` (``experiments/precond_spectrum.py``
measures both).

Every call records its convergence per damping (:meth:`~.iterative.IterativeSolver.diagnostics`): depth, scale and
the relative residual ``||(G_H + λI) x - v|| / ||v||`` of each vector, with ``G_H`` the mean curvature over a
held-out set ``H`` of ``min(8 * batch_size, n)`` training points: a seeded sample (``seed + 104729``) of the points
the recursion's batches did not visit in any repeat of that call when at least that many are left ("disjoint");
otherwise (the recursion visited nearly every point) the same-size seeded sample of the whole training set
("resampled": batches the recursion never drew as such; ``H`` is the whole set when ``n <= 8 * batch_size``, then
the residual is exact). ``G_H`` is a sample estimate of ``G``, so the residual carries its sampling noise.
Converged = the worst vector's residual <= ``converged_tol`` (default 0.1: the solution reproduces ``v`` to 10%)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data.base import LabeledData
from ..errors import SolverDivergedError, check
from ..progress import progress
from .base import Convergence, Damping
from .iterative import IterativeSolver


class LiSSA(IterativeSolver):
    name = "lissa"
    iteration_key = "depth"
    #: the held-out set's size, in batches, and the offset of its seed
    HELD_OUT_BATCHES, HELD_OUT_SEED = 8, 104729

    def __init__(self, *args: Any, depth: int = 200, scale: float | str = "auto", repeats: int = 1,
                 converged_tol: float = 0.1, preconditioner: Any = None, preconditioner_damping: Any = "same",
                 **kwargs: Any):
        kwargs.setdefault("batch_size", 32)
        super().__init__(*args, preconditioner=preconditioner, preconditioner_damping=preconditioner_damping,
                         **kwargs)
        self._pscale: dict[float, float] = {}  # preconditioned scale=auto: 2 mu_max per damping
        check(isinstance(depth, int) and depth >= 1, "solver.depth", depth, "must be an integer >= 1")
        check(isinstance(repeats, int) and repeats >= 1, "solver.repeats", repeats, "must be an integer >= 1")
        check(scale == "auto" or (isinstance(scale, (int, float)) and scale > 0), "solver.scale", scale,
              "must be > 0 or auto")
        check(isinstance(converged_tol, (int, float)) and converged_tol > 0, "solver.converged_tol", converged_tol,
              "must be > 0")
        self.depth, self.scale, self.repeats = depth, scale, repeats
        self._converged_tol = float(converged_tol)  # (private: not part of the fit's cache key)
        self._scale: float | None = None

    def fit(self, model: nn.Module, data: LabeledData, snapshots=None) -> None:
        """Keeps the model and data; estimates ``λ_max`` for ``scale=auto`` (preconditioned: ``μ_max`` per damping
        on first use, once the preconditioner is fitted)."""
        self.bind(model, data)
        if self.scale == "auto":  # (preconditioned: the scale is per damping, see _scales)
            self._scale = 2.0 * self._top_eigenvalue() if not self.preconditioned else 0.0
        else:
            self._scale = float(self.scale)

    def _top_eigenvalue(self, iters: int = 20) -> float:
        assert self._curv is not None and self._data is not None and self.layout is not None
        x, y, g = self._sample()
        v = torch.randn(1, self.layout.size, generator=g).to(self._curv.device, self._curv.dtype)
        lam = 0.0
        for _ in range(iters):
            w = self._curv.product(v / v.norm(), x, y)
            lam = float((w * v / v.norm()).sum())
            v = w
        return max(lam, 1e-12)

    @property
    def converged_tol(self) -> float:
        """A result counts as converged when its worst held-out relative residual is at most this."""
        return self._converged_tol

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(self._scale or 0.0, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._scale = float(state["scale"])

    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        return self.precondition_all(v, [damping])[0]

    def precondition_all(self, v: torch.Tensor, dampings: Sequence[Damping]) -> torch.Tensor:
        assert self._curv is not None and self._data is not None and self._scale is not None, "fit the solver first"
        t0 = time.perf_counter()
        k, d = len(v), len(dampings)
        lams = [self.resolve_damping(x) for x in dampings]
        lam = self.row_dampings(lams, k, self._curv.dtype, self._curv.device)
        s = self._scales(lams).repeat_interleave(k)[:, None]  # per row, damping-major

        def M(r: torch.Tensor) -> torch.Tensor:
            return self._precondition_rows(r, lam)

        V = v.to(self._curv.dtype).repeat(d, 1)  # [d*k, P], damping-major
        total = torch.zeros_like(V)
        visited = torch.zeros(len(self._data), dtype=torch.bool)
        x0 = M(V) / s  # the first step from x = 0
        x0norm = x0.norm(dim=1).clamp_min(1e-30)
        pre = f" (preconditioned by {self.preconditioner_name})" if self.preconditioned else ""
        for rep in range(self.repeats):
            x = x0.clone()
            batches = self._stream(rep)
            for j in progress(range(self.depth), desc=self.label):
                xb, yb, pos = next(batches)
                visited[pos] = True
                x = x + M(V - (self._curv.product(x, xb, yb) + lam * x)) / s
                if j % 10 == 9 or j == self.depth - 1:
                    norm = x.norm(dim=1)
                    if not torch.isfinite(norm).all() or (norm > 2 * (j + 2) * x0norm).any():
                        raise SolverDivergedError(
                            f"LiSSA{pre} diverged at step {j + 1} (scale {s.max().item():.3g}, damping {dampings}); "
                            f"use a larger solver.scale (e.g. {4 * s.max().item():.3g}) or a larger solver.damping")
                if self._monitor is not None and self.repeats == 1:
                    for i, damping in enumerate(dampings):
                        self._monitor(damping, j + 1, x[i * k:(i + 1) * k])
            total += x
        out = total / self.repeats
        self._record_convergence(out, V, lam, s, visited, dampings, k, time.perf_counter() - t0)
        return out.reshape(d, k, -1).to(v.dtype)

    def _scales(self, lams: Sequence[float]) -> torch.Tensor:
        """The scale ``s`` (1 / step size) per damping. Plain: ``2 λ_max(G) + λ`` (auto) or the fixed scale.
        Preconditioned: ``2 μ_max`` with ``μ_max`` the top eigenvalue of ``P^-1 (G + λI)`` (power iteration on the
        same sample as ``λ_max``; cached per λ), or the fixed scale."""
        dt = dict(dtype=self._curv.dtype, device=self._curv.device)
        if self.scale != "auto":
            return torch.full((len(lams),), float(self._scale), **dt)
        if not self.preconditioned:
            return torch.tensor(lams, **dt) + self._scale
        missing = [lv for lv in dict.fromkeys(lams) if lv not in self._pscale]
        if missing:
            for lv, mu in zip(missing, self._top_preconditioned(missing)):
                self._pscale[lv] = 2.0 * mu
        return torch.tensor([self._pscale[lv] for lv in lams], **dt)

    def _sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """The seeded sample of ``8 x batch_size`` training points the power iterations use."""
        assert self._data is not None
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(self._data), generator=g)[: 8 * self.batch_size]
        return self._data.images(idx), self._data.targets[idx], g

    def _top_preconditioned(self, lams: Sequence[float], iters: int = 20) -> list[float]:
        """Top eigenvalue of ``P^-1 (G_S + λI)`` per λ (all together; ``G_S`` on :meth:`_sample`)."""
        pre = self._preconditioner()
        assert self._curv is not None and self.layout is not None and pre is not None
        x, y, g = self._sample()
        lam = torch.tensor(list(lams), dtype=self._curv.dtype, device=self._curv.device)[:, None]
        u = torch.randn(len(lams), self.layout.size, generator=g).to(self._curv.device, self._curv.dtype)
        mu = torch.ones(len(lams), dtype=self._curv.dtype, device=self._curv.device)
        for _ in range(iters):
            u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)
            w = pre.apply(self._curv.product(u, x, y) + lam * u, lam)
            mu = w.norm(dim=1)
            u = w
        return [max(float(m), 1e-12) for m in mu]

    def held_out(self, visited: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Positions of the held-out set given the points the recursion ``visited`` (see the module doc)."""
        n = len(visited)
        m = min(self.HELD_OUT_BATCHES * self.batch_size, n)
        g = torch.Generator().manual_seed(self.seed + self.HELD_OUT_SEED)
        free = (~visited).nonzero().flatten()
        if len(free) >= m:
            pick = free[torch.randperm(len(free), generator=g)[:m]].sort().values
            return pick, f"held-out: {m} of the {len(free)} training points the recursion did not visit (disjoint)"
        pick = torch.randperm(n, generator=g)[:m].sort().values
        what = "all" if m == n else f"{m} of"
        return pick, f"held-out: {what} {n} training points, resampled (the recursion visited {int(visited.sum())})"

    def _record_convergence(self, X: torch.Tensor, V: torch.Tensor, lam: torch.Tensor, s: torch.Tensor,
                            visited: torch.Tensor, dampings: Sequence[Damping], k: int, solve_s: float) -> None:
        """Relative residuals of the rows of ``X`` (damping-major, ``k`` per damping) on the held-out set."""
        assert self._curv is not None and self._data is not None
        t0 = time.perf_counter()
        idx, on = self.held_out(visited)
        held = self._data.subset(idx)
        GX = torch.zeros_like(X)
        for x, y, _ in held.batches(self.batch_size):
            GX += self._curv.product(X, x, y) * len(y)
        r = V - (GX / len(held) + lam * X)
        vn = V.norm(dim=1)
        rel = torch.where(vn > 0, r.norm(dim=1) / vn.clamp_min(1e-300), r.norm(dim=1)).reshape(len(dampings), k)
        seconds = (time.perf_counter() - t0) / len(dampings)
        for i, damping in enumerate(dampings):
            worst = float(rel[i].max())
            self._record(damping, Convergence(
                float(lam[i * k]), self.depth, worst, float(rel[i].mean()), self.converged_tol,
                worst <= self.converged_tol, k, on, scale=float(s[i * k]), measure_s=seconds,
                solve_s=solve_s / len(dampings), preconditioner=self.preconditioner_name))

    def _stream(self, rep: int):
        """An endless seeded stream of training batches ``(x, y, positions)`` (reshuffled each epoch)."""
        assert self._data is not None
        epoch = 0
        while True:
            yield from self._data.batches(self.batch_size, shuffle=True, seed=self.seed + 7919 * rep + epoch)
            epoch += 1

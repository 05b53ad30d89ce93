"""EK-FAC and K-FAC: Kronecker-factored curvature per tracked block, with (EK-FAC) or without (K-FAC) the
eigenvalue correction of George et al. (2018), as used for influence by Grosse et al. (2023).

Per block with inputs ``a`` (bias column = 1; Conv2d: unfolded patches) and pre-activation output
gradients ``s`` over positions ``t`` (1 for a plain Linear; conv locations or ViT tokens otherwise), the
per-example gradient is ``G_i = sum_t s_t a_t^T``. Fitting takes two passes over the training data:

1. covariances ``A = E_i[sum_t a a^T]`` and ``S = E_i[sum_t s s^T] / T``; eigenbases ``Q_A``, ``Q_S`` (float64);
2. (EK-FAC) corrected eigenvalues ``Λ = E_i[(Q_S^T G_i Q_A)^2]`` — exact diagonal of the block curvature in
   the Kronecker eigenbasis. K-FAC uses ``Λ = λ_S λ_A^T`` instead (so ``G ≈ S ⊗ A``, exact for one example
   with one position).

``(G + λI)^-1 v = Q_S [(Q_S^T V Q_A) / (Λ + λ)] Q_A^T`` per block: the damping enters only here, so one fit
serves every damping; ``auto`` = 0.1 x the mean of all (corrected) eigenvalues, i.e. ``0.1 trace(G) / P`` as for
every solver. ``curvature="fisher"`` samples targets from the model (true Fisher; ``fisher_samples`` draws per
example); ``"empirical_fisher"`` uses the training targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..cache import Snapshots
from ..data.base import LabeledData
from ..errors import ConfigError
from ..progress import progress
from .base import Damping
from .blocks import BlockGradSolver, Capture
from .layout import Block


def _cov_a(a: torch.Tensor, bias: bool) -> torch.Tensor:
    """``sum_rows [a, 1]^T [a, 1]`` for ``a [N, in]`` without materialising the column of ones."""
    if not bias:
        return a.T @ a
    top = a.T @ a
    col = a.sum(0, keepdim=True)
    n = torch.full((1, 1), float(len(a)), dtype=a.dtype, device=a.device)
    return torch.cat([torch.cat([top, col.T], 1), torch.cat([col, n], 1)], 0)


def _rot_a(a: torch.Tensor, qa: torch.Tensor, bias: bool) -> torch.Tensor:
    """``[a, 1] @ Q_A`` without materialising the column of ones."""
    return a @ qa[:-1] + qa[-1] if bias else a @ qa


def _eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition (float64) that survives rank-deficient covariances: LAPACK's eigh can fail
    to converge on those, so retry with a tiny relative jitter, then fall back to an SVD."""
    m = (m + m.T) / 2
    try:
        return torch.linalg.eigh(m)
    except torch.linalg.LinAlgError:
        eps = 1e-12 * float(m.diagonal().abs().mean() + 1e-30)
        try:
            evals, evecs = torch.linalg.eigh(m + eps * torch.eye(len(m), dtype=m.dtype, device=m.device))
            return evals - eps, evecs
        except torch.linalg.LinAlgError:
            u, sv, _ = torch.linalg.svd(m)
            return sv.flip(0), u.flip(1)


class EKFAC(BlockGradSolver):
    """Eigenvalue-corrected K-FAC (``correct=True``); :class:`KFAC` is the same without the correction."""

    name = "ekfac"
    correct: bool = True

    def __init__(self, *args: Any, fisher_samples: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(fisher_samples, int) or fisher_samples < 1:
            raise ConfigError(f"solver.fisher_samples={fisher_samples!r} is invalid: must be an integer >= 1")
        self.fisher_samples = fisher_samples
        self.state: dict[str, torch.Tensor] = {}

    # -- fitting ------------------------------------------------------------------------------------------
    def fit(self, model: nn.Module, data: LabeledData, snapshots: Snapshots | None = None) -> None:
        self._snapshots = snapshots
        try:
            self._fit(model, data)
        finally:
            self._snapshots = None

    def _fit(self, model: nn.Module, data: LabeledData) -> None:
        if self.layout is None:
            self.setup(model)
        assert self.layout is not None
        blocks = self.layout.blocks
        gen = torch.Generator().manual_seed(self.seed)
        shard = data.subset(distributed.shard(len(data)))
        f64 = dict(dtype=torch.float64, device=self.device)
        A = {b.name: torch.zeros(b.in_dim, b.in_dim, **f64) for b in blocks}
        S = {b.name: torch.zeros(b.out_dim, b.out_dim, **f64) for b in blocks}
        n = torch.zeros((), **f64)
        positions = {b.name: torch.zeros((), **f64) for b in blocks}
        sums = {"n": n, **{f"A/{k}": v for k, v in A.items()}, **{f"S/{k}": v for k, v in S.items()},
                **{f"T/{k}": v for k, v in positions.items()}}
        done = self._resume("covariances", sums, gen)
        for x, y, _ in progress(shard.batches(self.batch_size, skip=done), desc=f"{self.name} covariances"):
            for _ in range(self.fisher_samples):
                with self._captured(model, x, y, gen) as cap:
                    for b in blocks:
                        a, s = cap.a[b.name], cap.s[b.name]
                        A[b.name] += _cov_a(a.flatten(0, 1), b.bias is not None).double()
                        S[b.name] += (s.flatten(0, 1).T @ s.flatten(0, 1)).double()
                        positions[b.name] += a.shape[0] * a.shape[1]
            n += len(y) * self.fisher_samples
            done += 1
            self._snapshot("covariances", done, sums, gen)
        if self.correct:  # the correction pass resumes from here (kept until the fit is cached)
            self._snapshot("covariances", done, sums, gen, final=True)
        for t in [n, *A.values(), *S.values(), *positions.values()]:
            distributed.all_reduce_sum(t)
        state: dict[str, torch.Tensor] = {}
        for i, b in enumerate(blocks):
            T = positions[b.name] / n
            eva, qa = _eigh(A[b.name] / n)
            evs, qs = _eigh(S[b.name] / n / T)
            state[f"{i}.QA"], state[f"{i}.QS"] = qa, qs
            state[f"{i}.lambda"] = torch.outer(evs.clamp_min(0), eva.clamp_min(0))
        self.state = state
        if self.correct:
            self._correct(model, shard, gen)
        self.state = {k: v.to(self.dtype) if k.endswith(("QA", "QS")) else v for k, v in self.state.items()}

    def _correct(self, model: nn.Module, data: LabeledData, gen: torch.Generator) -> None:
        """EK-FAC eigenvalue correction: mean squared per-example gradient in the Kronecker eigenbasis."""
        assert self.layout is not None
        blocks = self.layout.blocks
        lam = {i: torch.zeros(b.out_dim, b.in_dim, dtype=torch.float64, device=self.device) for i, b in enumerate(blocks)}
        n = torch.zeros((), dtype=torch.float64, device=self.device)
        qa = {i: self.state[f"{i}.QA"].to(self.dtype) for i in range(len(blocks))}
        qs = {i: self.state[f"{i}.QS"].to(self.dtype) for i in range(len(blocks))}
        sums = {"n": n, **{f"lambda/{i}": v for i, v in lam.items()}}
        done = self._resume("correction", sums, gen)
        for x, y, _ in progress(data.batches(self.batch_size, skip=done), desc=f"{self.name} eigenvalue correction"):
            for _ in range(self.fisher_samples):
                with self._captured(model, x, y, gen) as cap:
                    for i, b in enumerate(blocks):
                        rot = self._rotate(cap, b, qa[i], qs[i])
                        lam[i] += rot.square().sum(0).double()
            n += len(y) * self.fisher_samples
            done += 1
            self._snapshot("correction", done, sums, gen)
        distributed.all_reduce_sum(n)
        for i in lam:
            self.state[f"{i}.lambda"] = distributed.all_reduce_sum(lam[i]) / n

    def _rotate(self, cap: Capture, b: Block, qa: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        """Per-example gradients of a block in its eigenbasis, ``Q_S^T G_i Q_A``: ``[b, out, in]``."""
        a, s = cap.a[b.name], cap.s[b.name]
        bias = b.bias is not None
        if a.shape[1] == 1:  # rank one: rotate the two factors, O(out^2 + in^2) per example
            return (s[:, 0] @ qs).unsqueeze(2) * _rot_a(a[:, 0], qa, bias).unsqueeze(1)
        return torch.bmm((s @ qs).transpose(1, 2), _rot_a(a, qa, bias))

    # -- applying the inverse --------------------------------------------------------------------------------
    def mean_eigenvalue(self) -> float:
        assert self.layout is not None and self.state, "fit the solver first"
        total = sum(float(self.state[f"{i}.lambda"].sum()) for i in range(len(self.layout.blocks)))
        return total / self.layout.size

    def _inverse_eigenvalues(self, i: int, damping: Damping) -> torch.Tensor:
        lam = self.state[f"{i}.lambda"]
        return (1.0 / (lam + self.resolve_damping(damping))).to(self.dtype)

    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        assert self.layout is not None and self.state, "fit the solver first"
        out = torch.empty_like(v)
        for i, b in enumerate(self.layout.blocks):
            qa, qs = self.state[f"{i}.QA"], self.state[f"{i}.QS"]
            V = self.layout.block(v, b).to(self.dtype)
            rot = qs.T @ V @ qa
            out[:, b.slice] = (qs @ (rot * self._inverse_eigenvalues(i, damping)) @ qa.T).reshape(len(v), -1).to(v.dtype)
        return out

    # -- scoring specialisation ------------------------------------------------------------------------------
    def self_influence(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       dampings: Sequence[Damping]) -> torch.Tensor:
        """``sum_blocks sum (Q_S^T G_i Q_A)^2 / (Λ + λ)`` without forming per-example gradients for 1-position blocks."""
        assert self.layout is not None
        out = torch.zeros(len(dampings), len(x), dtype=torch.float64, device=self.device)
        with self._captured(model, x, y) as cap:
            for i, b in enumerate(self.layout.blocks):
                qa, qs = self.state[f"{i}.QA"], self.state[f"{i}.QS"]
                a, s = cap.a[b.name], cap.s[b.name]
                if a.shape[1] == 1:
                    s2, a2 = (s[:, 0] @ qs).square(), _rot_a(a[:, 0], qa, b.bias is not None).square()
                    for j, d in enumerate(dampings):
                        out[j] += ((s2 @ self._inverse_eigenvalues(i, d)) * a2).sum(1).double()
                else:
                    r2 = self._rotate(cap, b, qa, qs).square()
                    for j, d in enumerate(dampings):
                        out[j] += (r2 * self._inverse_eigenvalues(i, d)).sum((1, 2)).double()
        return out.to(self.dtype)

    # -- caching --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.to(self.device) for k, v in state.items()}
        self._mean_eig = None


class KFAC(EKFAC):
    """K-FAC: Kronecker-factored eigenvalues ``λ_S λ_A^T`` (no correction pass)."""

    name = "kfac"
    correct = False

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

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..cache import Snapshots
from ..data.base import LabeledData
from ..errors import ConfigError
from ..health import check_factors
from ..progress import progress
from .base import Damping
from .blocks import BlockGradSolver, Capture
from .layout import Block

log = logging.getLogger(__name__)

#: blocks with at most this many positions square their per-example gradients in the eigenbasis through products
#: of position pairs (:func:`_pair_products`: one matmul, ``T(T+1)/2`` rows per example, never ``[b, out, in]``);
#: beyond, the pairs cost more than forming the gradients chunk by chunk (ResNet-18 on 28x28 inputs, per batch:
#: layer3 T=4 pairs 0.03 s vs chunks 0.07 s, 0.1 s vs 0.5-3 s on a busy machine; layer2 T=16 0.18 s vs 0.02 s)
PAIRS_MAX_T = 8
#: otherwise per-example gradients ``[chunk, out, in]`` are formed at most this many bytes at a time, per device
#: type. CPU: below glibc's mmap threshold (32 MB), so the chunks reuse heap memory instead of page-faulting fresh
#: mappings (3-5x faster than one piece); other devices have no such cost and take bigger chunks (fewer launches).
CHUNK_BYTES = {"cpu": 16 * 2**20, "other": 256 * 2**20}


def precondition_rows(block_numel: int, itemsize: int, device_type: str) -> int:
    """Rows of ``[k, P]`` preconditioned at a time in one block: its ``[rows, out, in]`` work space within
    :data:`CHUNK_BYTES` (at least one row)."""
    return max(1, CHUNK_BYTES["cpu" if device_type == "cpu" else "other"] // (block_numel * itemsize))


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
    return _matmul_rows(a, qa[:-1]) + qa[-1] if bias else _matmul_rows(a, qa)


def _matmul_rows(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x @ m`` for ``x [..., k]`` as one 2-D matmul: a batched matmul of strided conv patches / output gradients
    ``[b, T, k]`` (transposed views) is many times slower (ResNet-18's layer3: 0.8 s instead of 0.04 s a batch)."""
    return (x.reshape(-1, x.shape[-1]) @ m).view(*x.shape[:-1], m.shape[-1])


def _pair_products(s_rot: torch.Tensor, a_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q_S^T G_i Q_A)^2 = sum_{t <= t'} w (s'_t s'_t') (a'_t a'_t')^T`` (``w`` = 1 on the diagonal, 2 off it) from
    the rotated factors ``s_rot [b, T, out]``, ``a_rot [b, T, in]``: the weighted ``[b * P, out]`` and ``[b * P, in]``
    factors over the ``P = T(T+1)/2`` position pairs. For one position (plain Linear, a conv on a 1x1 map) that is
    ``s'^2 (a'^2)^T``, summed over a batch in one matmul."""
    t, u = torch.triu_indices(s_rot.shape[1], s_rot.shape[1], device=s_rot.device)
    w = torch.where(t == u, 1.0, 2.0).to(s_rot.dtype)
    return (s_rot[:, t] * s_rot[:, u] * w[:, None]).flatten(0, 1), (a_rot[:, t] * a_rot[:, u]).flatten(0, 1)


def _rotated_squares(s_rot: torch.Tensor, a_rot: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(Q_S^T G_i Q_A)^2`` from the rotated factors ``s_rot [b, T, out]``, ``a_rot [b, T, in]`` (see
    :meth:`EKFAC._rotated_factors`), for consecutive chunks of examples: ``(rows, [chunk, out, in])``, each
    within :data:`CHUNK_BYTES`."""
    n, out, inn = len(s_rot), s_rot.shape[2], a_rot.shape[2]
    budget = CHUNK_BYTES["cpu" if s_rot.device.type == "cpu" else "other"]
    step = max(1, budget // (out * inn * s_rot.element_size()))
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        yield rows, torch.bmm(s_rot[rows].transpose(1, 2), a_rot[rows]).square_()


def _eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition (float64, ascending) of a covariance. Its exactly-zero rows and columns
    (inputs that are always zero: a conv's taps that only ever see padding, dead units) are eigenvectors of
    eigenvalue 0 (unit vectors), so only the rest is decomposed: ResNet-18's layer4 convs on 28x28 inputs see a
    1x1 map, 512 live inputs of 4608. (Any orthonormal basis of that null space is as good: the corrected
    eigenvalues are 0 on it, where ``(Λ + λ)^-1`` is ``1/λ`` times the identity whichever basis.)"""
    m = (m + m.T) / 2
    live = (m != 0).any(0)
    if bool(live.all()) or not bool(live.any()):
        return _eigh_dense(m)
    idx, dead = live.nonzero()[:, 0], (~live).nonzero()[:, 0]
    sub_evals, sub_evecs = _eigh_dense(m[idx][:, idx])
    evals = torch.cat([sub_evals, sub_evals.new_zeros(len(dead))])
    rows = m.new_zeros(m.shape)  # the eigenvectors as rows
    rows[torch.arange(len(idx), device=m.device)[:, None], idx] = sub_evecs.T
    rows[torch.arange(len(idx), len(m), device=m.device), dead] = 1.0
    order = evals.argsort(stable=True)
    return evals[order], rows[order].T  # column-major, as LAPACK returns them


def _eigh_dense(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition (float64) that survives rank-deficient covariances: LAPACK's eigh can fail
    to converge on those, so retry with a tiny relative jitter, then fall back to an SVD."""
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

    def __init__(self, *args: Any, fisher_samples: int = 1, max_examples: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(fisher_samples, int) or fisher_samples < 1:
            raise ConfigError(f"solver.fisher_samples={fisher_samples!r} is invalid: must be an integer >= 1")
        if max_examples is not None and not (isinstance(max_examples, int) and max_examples >= 1):
            raise ConfigError(f"solver.max_examples={max_examples!r} is invalid: must be an integer >= 1 or null")
        self.fisher_samples = fisher_samples
        if max_examples is not None:  # (absent from the fit key when null: existing fits keep their keys)
            self.max_examples = max_examples
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
        m = getattr(self, "max_examples", None)
        if m is not None and m < len(data):  # factors fitted on a seeded sample (the ladder's "how many points")
            g = torch.Generator().manual_seed(self.seed)
            data = data.subset(torch.randperm(len(data), generator=g)[:m].sort().values)
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
        t0 = time.perf_counter()

        def accumulate(cap: Capture, i: int, b: Block) -> None:  # (during the backward pass: see _captured)
            a, s = cap.a[b.name].to(self.dtype), cap.s[b.name].to(self.dtype)  # (stored bf16)
            A[b.name] += _cov_a(a.flatten(0, 1), b.bias is not None).double()
            S[b.name] += (s.flatten(0, 1).T @ s.flatten(0, 1)).double()
            positions[b.name] += a.shape[0] * a.shape[1]

        for x, y, _ in progress(shard.batches(self.batch_size, skip=done), desc=f"{self.name} covariances"):
            for _ in range(self.fisher_samples):
                self._each_block(model, x, y, accumulate, gen)
            n += len(y) * self.fisher_samples
            done += 1
            self._snapshot("covariances", done, sums, gen)
        if self.correct:  # the correction pass resumes from here (kept until the fit is cached)
            self._snapshot("covariances", done, sums, gen, final=True)
        for t in [n, *A.values(), *S.values(), *positions.values()]:
            distributed.all_reduce_sum(t)
        t1 = time.perf_counter()
        del sums  # (snapshotted) each block's covariances are freed once decomposed, the bases kept in self.dtype
        state: dict[str, torch.Tensor] = {}
        for i, b in enumerate(blocks):
            T = positions[b.name] / n
            check_factors(self.name, {f"{b.name} input covariance": A[b.name],
                                      f"{b.name} output-gradient covariance": S[b.name]}, "the fit")
            eva, qa = _eigh(A.pop(b.name) / n)
            evs, qs = _eigh(S.pop(b.name) / n / T)
            # (row-major, the layout the cache stores and reads back: a fresh fit then scores bitwise as a cached one)
            state[f"{i}.QA"], state[f"{i}.QS"] = qa.to(self.dtype).contiguous(), qs.to(self.dtype).contiguous()
            state[f"{i}.lambda"] = torch.outer(evs.clamp_min(0), eva.clamp_min(0))
        self.state = state
        t2 = time.perf_counter()
        if self.correct:
            self._correct(model, shard, gen)
        for i in range(len(blocks)):  # accumulated in float64; kept (and cached) in self.dtype, as the bases
            self.state[f"{i}.lambda"] = self.state[f"{i}.lambda"].to(self.dtype)
        log.info("%s fit: covariances %.1fs, eigendecomposition %.1fs%s", self.name, t1 - t0, t2 - t1,
                 f", correction {time.perf_counter() - t2:.1f}s" if self.correct else "")

    def _correct(self, model: nn.Module, data: LabeledData, gen: torch.Generator) -> None:
        """EK-FAC eigenvalue correction: mean squared per-example gradient in the Kronecker eigenbasis."""
        assert self.layout is not None
        blocks = self.layout.blocks
        lam = {i: torch.zeros(b.out_dim, b.in_dim, dtype=torch.float64, device=self.device) for i, b in enumerate(blocks)}
        n = torch.zeros((), dtype=torch.float64, device=self.device)
        sums = {"n": n, **{f"lambda/{i}": v for i, v in lam.items()}}
        done = self._resume("correction", sums, gen)

        def accumulate(cap: Capture, i: int, b: Block) -> None:  # (during the backward pass: see _captured)
            self._add_squared_rotated(cap, b, self.state[f"{i}.QA"], self.state[f"{i}.QS"], lam[i])

        for x, y, _ in progress(data.batches(self.batch_size, skip=done), desc=f"{self.name} eigenvalue correction"):
            for _ in range(self.fisher_samples):
                self._each_block(model, x, y, accumulate, gen)
            n += len(y) * self.fisher_samples
            done += 1
            self._snapshot("correction", done, sums, gen)
        distributed.all_reduce_sum(n)
        for i in lam:
            self.state[f"{i}.lambda"] = distributed.all_reduce_sum(lam[i]) / n

    def _add_squared_rotated(self, cap: Capture, b: Block, qa: torch.Tensor, qs: torch.Tensor,
                             total: torch.Tensor) -> None:
        """``total += sum_i (Q_S^T G_i Q_A)^2`` over the batch (``[out, in]``, float64)."""
        s_rot, a_rot = self._rotated_factors(cap, b, qa, qs)
        if s_rot.shape[1] <= PAIRS_MAX_T:
            ps, pa = _pair_products(s_rot, a_rot)
            total += (ps.T @ pa).double()
            return
        for _, sq in _rotated_squares(s_rot, a_rot):
            total += sq.sum(0).double()

    def _rotated_factors(self, cap: Capture, b: Block, qa: torch.Tensor,
                         qs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``s Q_S`` ``[b, T, out]`` and ``[a, 1] Q_A`` ``[b, T, in]``, the factors of a block's per-example
        gradients in its eigenbasis: ``Q_S^T G_i Q_A = sum_t (s_t Q_S)^T ([a_t, 1] Q_A)``."""
        return _matmul_rows(cap.s[b.name].to(qs.dtype), qs), _rot_a(cap.a[b.name].to(qa.dtype), qa, b.bias is not None)

    # -- applying the inverse --------------------------------------------------------------------------------
    def mean_eigenvalue(self) -> float:
        assert self.layout is not None and self.state, "fit the solver first"
        total = sum(float(self.state[f"{i}.lambda"].sum(dtype=torch.float64)) for i in range(len(self.layout.blocks)))
        return total / self.layout.size

    def _inverse_eigenvalues(self, i: int, damping: Damping) -> torch.Tensor:
        lam = self.state[f"{i}.lambda"]
        return (1.0 / (lam + self.resolve_damping(damping))).to(self.dtype)

    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        return self._precondition_into(v, damping, torch.empty_like(v))

    def precondition_(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        """In place, block by block (each block is read before it is overwritten): no ``[k, P]`` copy."""
        return self._precondition_into(v, damping, v)

    def _precondition_into(self, v: torch.Tensor, damping: Damping, out: torch.Tensor) -> torch.Tensor:
        """Block by block, a few rows at a time (:func:`precondition_rows`: the work space of a block's products,
        ``[rows, out, in]`` in ``self.dtype`` a few times over, stays within :data:`CHUNK_BYTES` whatever ``k``)."""
        assert self.layout is not None and self.state, "fit the solver first"
        for i, b in enumerate(self.layout.blocks):
            qa, qs = self.state[f"{i}.QA"], self.state[f"{i}.QS"]
            inv = self._inverse_eigenvalues(i, damping)
            step = precondition_rows(b.out_dim * b.in_dim, self.dtype.itemsize, v.device.type)
            for r in range(0, len(v), step):
                V = self.layout.block(v[r:r + step], b).to(self.dtype)
                rot = qs.T @ V @ qa
                out[r:r + step, b.slice] = (qs @ (rot * inv) @ qa.T).reshape(len(V), -1).to(v.dtype)
        return out

    # -- scoring specialisation ------------------------------------------------------------------------------
    def self_influence(self, model: nn.Module, x: Any, y: torch.Tensor,
                       dampings: Sequence[Damping]) -> torch.Tensor:
        """``sum_blocks sum (Q_S^T G_i Q_A)^2 / (Λ + λ)``: through position pairs for blocks with few positions
        (:data:`PAIRS_MAX_T`; no per-example gradients), else forming them a chunk of examples at a time."""
        assert self.layout is not None
        n = len(y)
        out = torch.zeros(len(dampings), n, dtype=torch.float64, device=self.device)

        def score(cap: Capture, i: int, b: Block) -> None:  # (during the backward pass: see _captured)
            s_rot, a_rot = self._rotated_factors(cap, b, self.state[f"{i}.QA"], self.state[f"{i}.QS"])
            inv = [self._inverse_eigenvalues(i, d) for d in dampings]
            if s_rot.shape[1] <= PAIRS_MAX_T:
                ps, pa = _pair_products(s_rot, a_rot)
                for j, v in enumerate(inv):
                    out[j] += ((ps @ v) * pa).view(n, -1).sum(1).double()
            else:
                flat = torch.stack(inv).flatten(1)  # [n_damping, out * in]
                for rows, sq in _rotated_squares(s_rot, a_rot):
                    out[:, rows] += (flat @ sq.flatten(1).T).double()

        self._each_block(model, x, y, score)
        return out.to(self.dtype)

    # -- caching --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        # (fits cached before the eigenvalues were kept in self.dtype hold them in float64: cast like a new fit's)
        self.state = {k: v.to(self.device, self.dtype if k.endswith(".lambda") else v.dtype) for k, v in state.items()}
        self._mean_eig = None


class KFAC(EKFAC):
    """K-FAC: Kronecker-factored eigenvalues ``λ_S λ_A^T`` (no correction pass)."""

    name = "kfac"
    correct = False

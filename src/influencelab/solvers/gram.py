"""Gram: the damped curvature's inverse *exactly*, at every damping from one decomposition, for models of any size
trained on few points (Woodbury; issue 29).

The curvature is a mean of per-example terms of rank at most ``C`` (the outputs of one example)::

    G = A^T A / n,   A = [a_1; ...; a_n],   a_i = H_i^(1/2) J_i   (fisher / GGN: J_i [C, P] the output Jacobian,
                                                                   H_i the loss Hessian in the outputs)
                                            a_i = g_i^T           (empirical_fisher: the loss gradient, C = 1)

so ``G`` has rank at most ``n C``. With the ``n C x n C`` Gram matrix ``K = A A^T = U diag(s) U^T`` (float64,
decomposed once), the Woodbury identity gives, for every damping ``λ > 0`` at once::

    (G + λI)^-1 v = (v - A^T U diag(1 / (s + nλ)) U^T A v) / λ

with no iteration to converge: the cost of a solve is two passes over the rows of ``A`` (``A v``, then
``A^T w``), whatever ``λ``, and ``A v`` is shared by every damping of :meth:`precondition_all`. This is the
reference the IHVP comparison needs where CG does not converge (small ``λ`` on a large model).

The rows are never all in memory unless they fit in ``keep_gb``: the Gram is formed block by block, an outer
block of ``A`` held while the later examples' rows are recomputed and multiplied into it (``block_gb`` bounds one
block); the fit is resumable (snapshots of ``K`` after each outer block). ``block_diagonal=True`` keeps one Gram
per tracked layer instead (the exact block-diagonal GGN: the approximation ladder's step between the exact GGN and
K-FAC), from the same rows at the same cost.

Every solve's relative residual ``||(G + λI) x - v|| / ||v||`` is measured (``residual=true``) with curvature
products that do not use the rows (jvp/vjp through the network, :class:`~.curvature.Curvature`; for
``block_diagonal`` the rows themselves) and recorded like an iterative solver's (:meth:`diagnostics`,
``converged`` at ``tol``), so a reference's exactness is a measurement, not an assumption. At a tiny damping the
measurement has a floor of its own: ``x`` has a null-space part ``||v_perp|| / λ`` on which a product returns zero
only up to its float64 rounding, and ``x = (v - A^T w) / λ`` carries the rounding of ``A^T w`` times ``1 / λ``: on
the tests' tiny CNN the residual is ~1e-4 at λ = 1e-8 and below 1e-6 from λ = 1e-6 (where the solve agrees with a
dense one to 1e-5 and 1e-9); on ResNet-18 (256 points) it was 1e-4 at λ = 1e-6. Hence ``refine`` (default 2):
iterative refinement, ``x <- x - (G_A + λI)^-1 r`` with the residual ``r`` measured through the network, repeated
while the residual is above ``tol``; each step costs one more curvature product per vector, and the steps taken are
recorded as the solve's ``iterations``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..data.base import LabeledData, batch_to
from ..errors import ConfigError
from ..progress import progress
from .base import Convergence, Damping, Solver, merge_diagnostics
from .blocks import BlockGradSolver, Capture, capturable
from .curvature import Curvature
from .grads import per_sample_grads

log = logging.getLogger(__name__)

#: the memory of the two blocks of rows a factored block's Gram is formed from when that is cheaper than summing over
#: its position pairs (:meth:`_Factors._gram_streamed`)
STREAM_BYTES = 2**30


def _rows(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """A factored block's rows ``[b C, out * in]`` from its output gradients ``s [b, C, T, out]`` and inputs
    ``a [b, T, in]``: row ``(i, c)`` is ``sum_t s_ict a_it^T``."""
    return torch.einsum("bcto,bti->bcoi", s, a).reshape(s.shape[0] * s.shape[1], -1)


class _Factors:
    """The rows of ``A`` for all ``n`` examples when every tracked block is a Linear or plain Conv2d, block by block
    in the cheaper of two forms (captured in one forward and ``C`` backward passes per batch, :class:`~.blocks.Capture`):

    * ``direct``: the block's rows ``R [n C, P_l]`` (small blocks with many positions: a stem conv);
    * ``factored``: inputs ``a [n, T, in]`` (bias column included) and output gradients ``s [n, C, T, out]`` over the
      block's ``T`` positions, row ``(i, c)`` being ``sum_t s_ict a_it^T`` (big blocks with few positions: a
      ResNet's last stages at 1 x 1 or 2 x 2). Its Gram is ``sum_{t,u} (S_t S_u^T) * (A_t A_u^T)``, or, where that
      costs more (many positions: a ResNet's first stage once the rows of all n examples no longer fit), ``R R^T``
      from rows formed a block of examples at a time; its products are two contractions, so the ``n C x P_l`` rows
      are never held at once.

    On ResNet-18 (28 x 28 inputs, 11.2M parameters) this keeps the rows of hundreds of examples in about a GB
    instead of ~0.9 GB per example."""

    def __init__(self, layout: Any, n: int, c: int):
        self.layout, self.n, self.c = layout, n, c
        self.kind: dict[str, str] = {}
        self.parts: dict[str, torch.Tensor] = {}  # preallocated for all n examples, filled batch by batch
        self._filled = 0

    def choose(self, blk: Any, T: int) -> str:
        """``direct`` or ``factored`` for a block with ``T`` positions, by the Gram's cost (and the rows' memory)."""
        n, c = self.n, self.c
        direct = (n * c) ** 2 * blk.size
        fits = n * c * blk.size * 8 <= 2 * 2**30
        return "direct" if fits and direct <= self.factored_cost(blk, T) else "factored"

    def add(self, inputs: dict[str, torch.Tensor], s_by_c: dict[str, list[torch.Tensor]]) -> None:
        """One batch's captured inputs ``[b, T, in]`` (no bias column) and per-row output gradients."""
        for blk in self.layout.blocks:
            a = inputs[blk.name]
            if blk.bias is not None:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            s = torch.stack(s_by_c[blk.name], dim=1)  # [b, C, T, out]
            kind = self.kind.setdefault(blk.name, self.choose(blk, a.shape[1]))
            i0, b = self._filled, len(a)
            if kind == "direct":
                self._slot(blk.name, (self.n * self.c, blk.size), a)[i0 * self.c:(i0 + b) * self.c] = _rows(s, a)
            else:
                self._slot(blk.name + ".a", (self.n, *a.shape[1:]), a)[i0:i0 + b] = a
                self._slot(blk.name + ".s", (self.n, *s.shape[1:]), s)[i0:i0 + b] = s
        self._filled += len(next(iter(inputs.values())))

    def _slot(self, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The full-size tensor of ``key`` (allocated on first use: no list of batches concatenated at the end,
        which would hold the rows twice)."""
        if key not in self.parts:
            self.parts[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self.parts[key]

    def finish(self) -> None:
        assert self._filled == self.n, (self._filled, self.n)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def gram(self, blk: Any) -> torch.Tensor:
        """``A_l A_l^T`` of one block, ``[n C, n C]``."""
        if self.kind[blk.name] == "direct":
            R = self.parts[blk.name]
            return R @ R.T
        a, s = self.parts[blk.name + ".a"], self.parts[blk.name + ".s"]
        T = a.shape[1]
        if self.streamed_cost(blk, T) < self.factored_cost(blk, T):
            return self._gram_streamed(a, s, blk.size)
        return self._gram_pairs(a, s)

    def _gram_pairs(self, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``sum_{t,u} (S_t S_u^T) * (A_t A_u^T)`` as ``D + P + P^T``, with ``D`` the ``t = u`` terms and ``P`` those
        with ``t < u`` (no transposed add per pair, which on n C = 10,240 rows costs as much as the pair's product)."""
        n, c, T = self.n, self.c, a.shape[1]
        D = torch.zeros(n * c, n * c, dtype=torch.float64, device=a.device)
        P = torch.zeros_like(D) if T > 1 else D
        for t in range(T):
            St = s[:, :, t].reshape(n * c, -1)
            for u in range(t, T):
                M = St @ s[:, :, u].reshape(n * c, -1).T
                M.view(n, c, n, c).mul_((a[:, t] @ a[:, u].T)[:, None, :, None])
                (D if u == t else P).add_(M)
        return D if T == 1 else D.add_(P).add_(P.T)

    def factored_cost(self, blk: Any, T: int) -> float:
        """Multiply-adds of the Gram from the factors, position pair by position pair."""
        n, c = self.n, self.c
        return (n * c) ** 2 * T * T * blk.out_dim / 2 + n * n * T * T * blk.in_dim

    def streamed_cost(self, blk: Any, T: int) -> float:
        """Multiply-adds of the Gram from rows formed block by block from the factors (:meth:`_gram_streamed`): the
        rows' products, and the rows formed again for every pair of example blocks."""
        n, c = self.n, self.c
        m = self._stream_examples(blk.size)
        return (n * c) ** 2 * blk.size / 2 + n * c * T * blk.size * (math.ceil(n / m) + 1) / 2

    def _stream_examples(self, size: int) -> int:
        """Examples per block of rows in :meth:`_gram_streamed`: two blocks in ``STREAM_BYTES``."""
        return max(1, min(self.n, STREAM_BYTES // (2 * self.c * size * 8)))

    def _gram_streamed(self, a: torch.Tensor, s: torch.Tensor, size: int) -> torch.Tensor:
        """``R R^T`` with ``R``'s rows formed from the factors a block of examples at a time (a block whose rows do
        not fit in memory, but whose positions are too many for the pairwise sum: ResNet-18's layer1 on 1,024
        points, ~70 s per block here against ~37 min for the pairwise sum)."""
        n, c = self.n, self.c
        m = self._stream_examples(size)
        K = torch.empty(n * c, n * c, dtype=torch.float64, device=a.device)

        def rows(i0: int) -> torch.Tensor:
            return _rows(s[i0:i0 + m], a[i0:i0 + m])

        for i0 in range(0, n, m):
            Ri = rows(i0)
            for j0 in range(i0, n, m):
                Rj = Ri if j0 == i0 else rows(j0)
                blk = Ri @ Rj.T
                K[i0 * c:i0 * c + len(Ri), j0 * c:j0 * c + len(Rj)] = blk
                if j0 != i0:
                    K[j0 * c:j0 * c + len(Rj), i0 * c:i0 * c + len(Ri)] = blk.T
        return K

    def apply(self, blk: Any, V: torch.Tensor) -> torch.Tensor:
        """``A_l v_l`` for the block's part ``V [k, out, in]``: ``[n C, k]``."""
        if self.kind[blk.name] == "direct":
            return self.parts[blk.name] @ V.reshape(len(V), -1).T
        a, s = self.parts[blk.name + ".a"], self.parts[blk.name + ".s"]
        return torch.einsum("ncto,ntko->nck", s, torch.einsum("nti,koi->ntko", a, V)).reshape(-1, len(V))

    def apply_t(self, blk: Any, W: torch.Tensor) -> torch.Tensor:
        """``A_l^T w`` for ``W [n C, k]``: ``[k, out, in]``."""
        if self.kind[blk.name] == "direct":
            return (W.T @ self.parts[blk.name]).reshape(W.shape[1], blk.out_dim, blk.in_dim)
        a, s = self.parts[blk.name + ".a"], self.parts[blk.name + ".s"]
        Ws = torch.einsum("nck,ncto->ntko", W.view(self.n, self.c, -1), s)
        return torch.einsum("ntko,nti->koi", Ws, a)


class Gram(Solver):
    name = "gram"
    curvatures = ("fisher", "empirical_fisher")

    def __init__(self, *args: Any, max_rank: int = 20_000, block_gb: float = 2.0, keep_gb: float = 4.0,
                 block_diagonal: bool = False, residual: bool = True, tol: float = 1e-6, capture: bool = True,
                 residual_chunk: int = 4, refine: int = 2, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not (isinstance(refine, int) and refine >= 0):
            raise ConfigError(f"solver.refine={refine!r} is invalid: give an integer >= 0 (iterative refinement steps)")
        for key, val in (("solver.block_gb", block_gb), ("solver.keep_gb", keep_gb)):
            if not (isinstance(val, (int, float)) and val >= 0):
                raise ConfigError(f"{key}={val!r} is invalid: give a number of GiB >= 0")
        if not (isinstance(max_rank, int) and max_rank >= 1):
            raise ConfigError(f"solver.max_rank={max_rank!r} is invalid: give an integer >= 1")
        self.max_rank, self.block_gb, self.keep_gb = max_rank, float(block_gb), float(keep_gb)
        self.block_diagonal, self.residual, self.tol = bool(block_diagonal), bool(residual), float(tol)
        self.capture = bool(capture)
        self.residual_chunk = max(1, int(residual_chunk))  # vectors per residual product (its memory)
        self.refine = refine  # iterative refinement steps (each one more curvature product per vector; needs residual)
        self._eig: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per part: (s, U)
        self._model: nn.Module | None = None
        self._data: LabeledData | None = None
        self._curv: Curvature | None = None
        self._rows_kept: torch.Tensor | None = None
        self._factors: _Factors | None = None
        self._av: tuple[tuple[Any, ...], torch.Tensor] | None = None  # (key of v, A v) for the last v
        self._convergence: dict[Damping, Convergence] = {}
        self._outputs: int | None = None

    def fit_config(self) -> dict[str, Any]:
        cfg = super().fit_config()
        for k in ("block_gb", "keep_gb", "residual", "tol", "capture", "residual_chunk", "refine"):  # (where rows live
            cfg.pop(k, None)                                                # and what is measured or refined, not the fit)
        return cfg

    def solve_config(self) -> dict[str, Any]:
        return {"refine": self.refine} if self.residual and self.refine else {}

    # -- the parts: the whole parameter vector, or one per tracked layer ---------------------------------------
    def _parts(self) -> list[slice]:
        assert self.layout is not None
        if self.block_diagonal:
            return [b.slice for b in self.layout.blocks]
        return [slice(0, self.layout.size)]

    # -- rows of A ----------------------------------------------------------------------------------------------
    def bind(self, model: nn.Module, data: LabeledData) -> None:
        layout = self.layout or self.setup(model)
        self._model, self._data = model, data
        self._curv = Curvature(model, layout, self.curvature if self.curvature == "fisher" else "fisher", self.task)
        self._rows_kept, self._av, self._factors = None, None, None

    def _rows(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        """The rows of ``A`` of one batch, ``[b C, P]`` (float64)."""
        assert self._model is not None and self.layout is not None and self._curv is not None
        if self._capturable():
            return self._rows_captured(x, y)
        if self.curvature == "empirical_fisher":
            return per_sample_grads(self._model, self.layout, batch_to(x, self.device, self.dtype), y.to(self.device),
                                    self.task.loss, self.task).double()
        J, out = self._curv.output_jacobian(x)  # [b, C, P]
        H = self.task.loss_hessian(out, y.to(out.device)).double()  # [b, C, C]
        e, Q = torch.linalg.eigh((H + H.transpose(1, 2)) / 2)
        root = (Q * e.clamp_min(0).sqrt().unsqueeze(1)) @ Q.transpose(1, 2)
        return torch.bmm(root, J.double()).reshape(-1, J.shape[-1])

    def _capturable(self) -> bool:
        """Whether every tracked block's per-example gradient can come from hooks (Linear, plain Conv2d): ``C``
        ordinary backward passes per batch instead of torch.func's vmapped per-example Jacobians (ResNet-18 in
        float64 on 2 CPU cores: ~0.1 s instead of ~20 s per example)."""
        assert self.layout is not None
        return self.capture and all(capturable(m) for m in self.layout.modules.values())

    def _passes(self, x: Any, y: torch.Tensor) -> Iterator[tuple[Any, int]]:
        """One forward of the batch, then per output row ``c`` a backward pass with each example's cotangent
        ``H_i^(1/2)[c]`` (fisher; empirical fisher: one backward of the summed loss); yields ``(capture, c)`` after
        each, its per-block output gradients those of row ``c`` (:class:`~.blocks.Capture`)."""
        assert self._model is not None and self.layout is not None
        layout = self.layout
        with Capture(layout.modules, layout.blocks, torch.float64) as cap, torch.enable_grad():
            params = list(self._model.parameters())
            req = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(False)
            try:
                out = self.task.forward(self._model, batch_to(x, self.device, self.dtype))
                y = y.to(self.device)
                if self.curvature == "empirical_fisher":
                    cots: list[torch.Tensor | None] = [None]
                else:
                    H = self.task.loss_hessian(out.detach().double(), y)  # [b, C, C]
                    e, Q = torch.linalg.eigh((H + H.transpose(1, 2)) / 2)
                    root = (Q * e.clamp_min(0).sqrt().unsqueeze(1)) @ Q.transpose(1, 2)
                    cots = [root[:, c].reshape(out.shape).to(out.dtype) for c in range(root.shape[1])]
                for c, cot in enumerate(cots):
                    if cot is None:
                        self.task.loss(out, y).sum().backward()
                    else:
                        out.backward(cot, retain_graph=c < len(cots) - 1)
                    yield cap, c
            finally:
                for p, r in zip(params, req, strict=True):
                    p.requires_grad_(r)

    def _rows_captured(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        """:meth:`_rows` by hooks (:meth:`_passes`), the per-example block gradients of each pass."""
        assert self.layout is not None
        layout, chunks = self.layout, []
        for cap, _ in self._passes(x, y):
            row = torch.empty(len(y), layout.size, dtype=torch.float64, device=self.device)
            for blk in layout.blocks:
                layout.block(row, blk).copy_(BlockGradSolver._block_grads(self, cap, blk))
            chunks.append(row)
        return torch.stack(chunks, dim=1).reshape(-1, layout.size)

    def _build_factors(self) -> _Factors:
        """Every example's rows as :class:`_Factors` (one pass over the data)."""
        assert self._data is not None and self.layout is not None
        if self._factors is None:
            f = _Factors(self.layout, len(self._data), self._outputs_per_example())
            for x, y, _ in progress(self._data.batches(self.batch_size), desc="gram rows (captured)",
                                    total=math.ceil(len(self._data) / self.batch_size)):
                s_by_c: dict[str, list[torch.Tensor]] = {b.name: [] for b in self.layout.blocks}
                inputs: dict[str, torch.Tensor] = {}
                for cap, c in self._passes(x, y):
                    if c == 0:
                        inputs = {b.name: cap.a[b.name].double() for b in self.layout.blocks}
                    for b in self.layout.blocks:
                        s_by_c[b.name].append(cap.s[b.name].double().clone())
                f.add(inputs, s_by_c)
            f.finish()
            self._factors = f
            log.info("gram rows: %s, %.2f GB (%s)", ", ".join(f"{k} {sum(v == k for v in f.kind.values())}"
                                                          for k in ("direct", "factored")), f.nbytes() / 2**30,
                     "per-layer factors")
        return self._factors

    def _outputs_per_example(self) -> int:
        if self._outputs is None:
            assert self._data is not None
            x, y, _ = next(iter(self._data.batches(1)))
            self._outputs = len(self._rows(x, y))
        return self._outputs

    def _examples_per_block(self) -> int:
        assert self.layout is not None
        per = self._outputs_per_example() * self.layout.size * 8
        return max(1, min(self.batch_size, int(self.block_gb * 2**30 // per)))

    def _fits_in_memory(self) -> bool:
        assert self._data is not None and self.layout is not None
        return len(self._data) * self._outputs_per_example() * self.layout.size * 8 <= self.keep_gb * 2**30

    def _row_blocks(self, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows)`` of ``A`` for the examples from ``start`` on, block by block (or the kept rows)."""
        assert self._data is not None
        c = self._outputs_per_example()
        if self._rows_kept is None and self._fits_in_memory():
            self._rows_kept = torch.cat([self._rows(x, y) for x, y, _ in self._data.batches(self._examples_per_block())])
        if self._rows_kept is not None:
            yield start * c, self._rows_kept[start * c:]
            return
        data = self._data if start == 0 else self._data.subset(torch.arange(start, len(self._data)))
        row = start * c
        for x, y, _ in data.batches(self._examples_per_block()):
            rows = self._rows(x, y)
            yield row, rows
            row += len(rows)

    # -- fit: the Gram matrix (per part) and its eigendecomposition ----------------------------------------------
    def fit(self, model: nn.Module, data: LabeledData, snapshots=None) -> None:
        self.layout or self.setup(model)
        self.bind(model, data)
        self._snapshots = snapshots
        n, c = len(data), self._outputs_per_example()
        r = n * c
        if r > self.max_rank:
            raise ConfigError(f"solver=gram on {n:,} points x {c} outputs is invalid: its Gram matrix would be "
                              f"{r:,} x {r:,} (solver.max_rank={self.max_rank:,}); use fewer training points "
                              f"(dataset.subset) or solver=cg")
        parts = self._parts()
        t0 = time.perf_counter()
        if self._capturable():
            f = self._build_factors()
            K = torch.zeros(len(parts), r, r, dtype=torch.float64, device=self.device)
            for i, blk in enumerate(progress(self.layout.blocks, desc="gram matrix (layers)")):
                K[i if self.block_diagonal else 0] += f.gram(blk)
            self._decompose(K)
            log.info("gram fit: %d x %d Gram%s in %.1fs", r, r, f" x {len(parts)} layers" if len(parts) > 1 else "",
                     time.perf_counter() - t0)
            return
        sums = {"K": torch.zeros(len(parts), r, r, dtype=torch.float64)}
        m = n if self._fits_in_memory() else self._examples_per_block()
        starts = list(range(0, n, m))
        done = self._resume("gram", sums, None)
        K = sums["K"]
        for i in progress(range(done, len(starts)), desc="gram matrix (outer blocks)", total=len(starts),
                          initial=done):
            a0 = starts[i]
            a1 = min(a0 + m, n)
            rows_a = torch.cat([rw for _, rw in self._rows_range(a0, a1)])
            for p, sl in enumerate(parts):
                K[p, a0 * c:a1 * c, a0 * c:a1 * c] = rows_a[:, sl] @ rows_a[:, sl].T
            for row, rows_b in (self._row_blocks(a1) if a1 < n else ()):  # the later examples, streamed
                for p, sl in enumerate(parts):
                    blk = rows_a[:, sl] @ rows_b[:, sl].T
                    K[p, a0 * c:a1 * c, row:row + len(rows_b)] = blk
                    K[p, row:row + len(rows_b), a0 * c:a1 * c] = blk.T
            self._snapshot("gram", i + 1, sums, None, final=i + 1 == len(starts))
        self._decompose(K)
        log.info("gram fit: %d x %d Gram%s in %.1fs (%s rows in memory)", r, r,
                 f" x {len(parts)} layers" if len(parts) > 1 else "", time.perf_counter() - t0,
                 "all" if self._rows_kept is not None else f"blocks of {m} examples")

    def _decompose(self, K: torch.Tensor) -> None:
        self._eig = []
        for p in range(len(K)):
            Kp = K[p].to(self.device)  # (on the solver's device, where the rows are: a GPU's eigh)
            s, U = torch.linalg.eigh((Kp + Kp.T) / 2)
            self._eig.append((s.clamp_min(0), U))

    def _rows_range(self, a0: int, a1: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Rows of the examples ``a0 .. a1 - 1``."""
        c = self._outputs_per_example()
        if self._rows_kept is not None or self._fits_in_memory():
            for row, rows in self._row_blocks(a0):
                yield row, rows[: (a1 - a0) * c]
            return
        assert self._data is not None
        x_sub = self._data.subset(torch.arange(a0, a1))
        for x, y, _ in x_sub.batches(a1 - a0):
            yield a0 * c, self._rows(x, y)

    # -- solves ----------------------------------------------------------------------------------------------------
    def _apply_a(self, V: torch.Tensor, memo: bool = True) -> torch.Tensor:
        """``A_p v_p`` per part: ``[parts, n C, k]`` for ``V [k, P]`` (float64); memoised for the last ``V``."""
        # (the sum tells apart a new tensor that reuses a freed one's memory; summed without a float64 copy of V)
        key = (V.data_ptr(), tuple(V.shape), V._version, float(V.sum(dtype=torch.float64)))
        if memo and self._av is not None and self._av[0] == key:
            return self._av[1]
        parts = self._parts()
        assert self._eig is not None
        r = self._eig[0][0].numel()
        out = torch.zeros(len(parts), r, len(V), dtype=torch.float64, device=self.device)
        Vd = V.double()
        if self._capturable():
            f = self._build_factors()
            for i, blk in enumerate(self.layout.blocks):
                out[i if self.block_diagonal else 0] += f.apply(blk, self.layout.block(Vd, blk))
            if memo:
                self._av = (key, out)
            return out
        for row, rows in self._row_blocks(0):
            for p, sl in enumerate(parts):
                out[p, row:row + len(rows)] = rows[:, sl] @ Vd[:, sl].T
        if memo:
            self._av = (key, out)
        return out

    def _apply_at(self, W: torch.Tensor) -> torch.Tensor:
        """``A_p^T w_p`` per part, as ``[k, P]`` rows, for ``W [parts, n C, k]``."""
        assert self.layout is not None
        out = torch.zeros(W.shape[-1], self.layout.size, dtype=torch.float64, device=self.device)
        if self._capturable():
            f = self._build_factors()
            for i, blk in enumerate(self.layout.blocks):
                self.layout.block(out, blk).copy_(f.apply_t(blk, W[i if self.block_diagonal else 0]))
            return out
        for row, rows in self._row_blocks(0):
            for p, sl in enumerate(self._parts()):
                out[:, sl] += W[p, row:row + len(rows)].T @ rows[:, sl]
        return out

    def _check(self, lams: Sequence[float]) -> None:
        if self._eig is None:
            raise RuntimeError("fit the solver first")
        if self._model is None:
            raise RuntimeError("solver=gram needs its model and data: call bind(model, data) after loading a fit")
        for lam in lams:
            if not lam > 0:
                raise ConfigError(f"solver.damping={lam:g} is invalid for solver=gram: the Woodbury identity needs "
                                  "λ > 0 (use solver=exact for λ = 0 on a tiny model)")

    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        return self.precondition_all(v, [damping])[0]

    def _solve_rows(self, R: torch.Tensor, lam_rows: torch.Tensor) -> torch.Tensor:
        """``(G_A + λ_i I)^-1 r_i`` for rows ``R [m, P]`` (float64), each at its own damping ``lam_rows [m, 1]``."""
        assert self._eig is not None and self._data is not None
        n = len(self._data)
        AR = self._apply_a(R, memo=False)  # [parts, r, m]
        W = torch.empty_like(AR)
        for p, (s, U) in enumerate(self._eig):
            W[p] = U @ ((U.T @ AR[p]) / (s[:, None] + n * lam_rows.T))
        return self._apply_at(W).neg_().add_(R).div_(lam_rows)

    def precondition_all(self, v: torch.Tensor, dampings: Sequence[Damping]) -> torch.Tensor:
        lams = [self.resolve_damping(d) for d in dampings]
        self._check(lams)
        assert self._eig is not None and self._data is not None
        t0 = time.perf_counter()
        n = len(self._data)
        AV = self._apply_a(v)  # [parts, r, k]
        k = v.shape[0]
        W = torch.zeros(AV.shape[0], AV.shape[1], k * len(lams), dtype=torch.float64, device=AV.device)
        for p, (s, U) in enumerate(self._eig):
            UtAV = U.T @ AV[p]
            for j, lam in enumerate(lams):
                W[p, :, j * k:(j + 1) * k] = U @ (UtAV / (s + n * lam)[:, None])
        X = self._apply_at(W).reshape(len(lams), k, -1)  # A^T w, then in place (v - A^T w) / λ: no copies of
        del W                                             # [dampings x k, P] (1.4 GB per 16 ResNet-18 vectors)
        lam_t = torch.tensor(lams, dtype=torch.float64, device=X.device)[:, None, None]
        X.neg_().add_(v.unsqueeze(0).to(X.dtype)).div_(lam_t)
        solve_s = time.perf_counter() - t0
        if self.residual:
            self._measure(v, X, dampings, lams, solve_s)
        return X.to(v.dtype)

    def _measure(self, v: torch.Tensor, X: torch.Tensor, dampings: Sequence[Damping], lams: Sequence[float],
                 solve_s: float) -> None:
        """Record ``||(G + λI) x - v|| / ||v||`` per damping (worst and mean over the vectors)."""
        t0 = time.perf_counter()
        assert self._curv is not None and self._data is not None
        L, k, P = X.shape
        flat = X.reshape(L * k, P)
        lam_rows = torch.tensor(list(lams), dtype=torch.float64, device=flat.device).repeat_interleave(k)[:, None]
        vd = v.double()
        vnorm = vd.norm(dim=1).clamp_min(1e-300).repeat(L)
        if self.block_diagonal:  # (its own operator: the rows, per layer)
            def product(rows: torch.Tensor) -> torch.Tensor:
                return self._apply_at(self._apply_a(rows, memo=False)) / len(self._data)
            on = "rows of A per layer (block-diagonal G)"
        else:
            curv = self._curv if self.curvature == "fisher" else Curvature(self._model, self.layout,
                                                                          "empirical_fisher", self.task)

            def product(rows: torch.Tensor) -> torch.Tensor:
                return curv.mean_product(rows, self._data, self.batch_size).double()
            on = "all training points (jvp/vjp products)"
        norms, steps = [], torch.zeros(L * k, dtype=torch.long)
        for i in range(0, L * k, self.residual_chunk):  # (a few vectors at a time: no [L k, P] temporaries)
            rows = flat[i:i + self.residual_chunk]  # (a view of X: refined in place)
            lam_i = lam_rows[i:i + len(rows)]
            for step in range(self.refine + 1):
                r = product(rows).add_(lam_i * rows).sub_(vd[torch.arange(i, i + len(rows)) % k])
                rel = r.norm(dim=1) / vnorm[i:i + len(rows)]
                if step == self.refine or float(rel.max()) <= self.tol:
                    break
                # iterative refinement: x <- x - (G_A + λI)^-1 r. The rows' G_A and the network's G differ by
                # rounding (times ||x|| ~ 1 / λ at a tiny damping); each step divides the residual by about
                # that relative difference / λ, so one or two reach the float64 solve of the network's G
                rows.sub_(self._solve_rows(r, lam_i))
                steps[i:i + len(rows)] = step + 1
            norms.append(rel)
        res = (torch.cat(norms)).reshape(L, k)
        measure_s = time.perf_counter() - t0
        steps_by_d = steps.reshape(L, k)
        for j, d in enumerate(dampings):
            worst = float(res[j].max())
            accept = self.tol
            conv = Convergence(damping=float(lams[j]), iterations=int(steps_by_d[j].max()), rel_residual_max=worst,
                               rel_residual_mean=float(res[j].mean()), tol=accept,
                               converged=bool(worst <= accept) and math.isfinite(worst), n_vectors=k,
                               residual_on=on, measure_s=measure_s / L, solve_s=solve_s / L)
            self._convergence = merge_diagnostics(self._convergence, {d: conv})
            if not conv.converged:
                log.warning("gram at damping %g: relative residual %.3g > solver.tol=%g. At a tiny damping that can "
                            "be float64's floor (a null-space part ||v_perp|| / λ of x, and the rounding of A^T w "
                            "times 1 / λ) after solver.refine=%d refinement steps; raise solver.refine, compare with "
                            "a larger damping's residual, or try solver.capture=false if a layer's hooks may not see "
                            "what the network computes", float(lams[j]), worst, accept, self.refine)

    def self_influence(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       dampings: Sequence[Damping]) -> torch.Tensor:
        """``g^T (G + λI)^-1 g`` per example and damping, every damping from one ``A g`` pass."""
        g = self.train_grads(model, x, y)
        return (self.precondition_all(g, dampings) * g.unsqueeze(0)).sum(-1)

    # -- damping="auto", diagnostics, cache ---------------------------------------------------------------------
    def mean_eigenvalue(self) -> float:
        """``trace(G) / P = trace(K) / (n P)``, exactly."""
        assert self._eig is not None and self._data is not None and self.layout is not None, "fit the solver first"
        return float(sum(s.sum() for s, _ in self._eig)) / (len(self._data) * self.layout.size)

    def diagnostics(self) -> dict[Damping, Convergence]:
        return dict(self._convergence)

    def reset_diagnostics(self) -> None:
        self._convergence = {}

    def set_diagnostics(self, record) -> None:
        self._convergence = dict(record)

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self._eig is not None
        out: dict[str, torch.Tensor] = {}
        for p, (s, U) in enumerate(self._eig):
            out[f"s.{p}"], out[f"U.{p}"] = s, U
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        parts = len({k.split(".")[1] for k in state})
        self._eig = [(state[f"s.{p}"].to(self.device, torch.float64), state[f"U.{p}"].to(self.device, torch.float64))
                     for p in range(parts)]
        self._mean_eig = None

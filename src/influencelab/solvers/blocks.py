"""Per-example gradients of the tracked blocks from one forward/backward pass (hooks), the fast path shared
by the Kronecker-factored solvers (EK-FAC, K-FAC) and the identity baseline.

For a block with inputs ``a`` (Conv2d: unfolded patches) and pre-activation output gradients ``s`` over
positions ``t`` (1 for a plain Linear; conv locations or ViT tokens otherwise), the per-example gradient of the
summed loss is ``G_i = sum_t s_t [a_t, 1]^T``. Capturing ``a`` and ``s`` costs one ordinary backward pass per
batch, instead of torch.func's vmapped per-example graphs, and scores against plain Linear blocks never form
``G_i`` at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import Solver
from .layout import Block


def capturable(m: nn.Module) -> bool:
    """Whether the hooks can express ``m``'s per-example gradient (grouped or string-padded convs cannot)."""
    return not isinstance(m, nn.Conv2d) or (
        m.groups == 1 and not isinstance(m.padding, str) and m.padding_mode == "zeros")


class Capture:
    """Forward/backward hooks that record each tracked block's inputs ``[b, T, in]`` (without the bias column)
    and output gradients ``[b, T, out]``."""

    def __init__(self, modules: dict[str, nn.Module], blocks: list[Block], dtype: torch.dtype):
        self.blocks = blocks
        self.modules = modules
        self.dtype = dtype  # captured tensors are cast to it (they are bf16/fp16 under autocast)
        self.a: dict[str, torch.Tensor] = {}
        self.s: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []

    def _inputs(self, blk: Block, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(m, nn.Conv2d):
            if not capturable(m):
                raise ConfigError(f"solver.modules includes {blk.name!r}: Conv2d with groups={m.groups}, "
                                  f"padding={m.padding!r}, padding_mode={m.padding_mode!r} is not supported by "
                                  f"Kronecker-factored solvers; exclude it with solver.modules=re:PATTERN")
            a = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        return a  # the bias column of ones is implicit (see _cov_a, _rot_a, _block_grads)

    def __enter__(self) -> Capture:
        for blk in self.blocks:
            m = self.modules[blk.name]

            def fwd(mod, inp, out, blk=blk):
                self.a[blk.name] = self._inputs(blk, mod, inp[0].detach().to(self.dtype))
                conv = isinstance(mod, nn.Conv2d)
                if out.requires_grad:
                    def bwd(g, blk=blk, conv=conv):
                        g = g.detach().to(self.dtype)
                        self.s[blk.name] = (g.flatten(2).transpose(1, 2) if conv
                                            else g.reshape(g.shape[0], -1, g.shape[-1]))
                    out.register_hook(bwd)

            self.handles.append(m.register_forward_hook(fwd))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.a.clear()
        self.s.clear()


class PreparedQueries:
    """Preconditioned queries ``[k, P]`` seen block by block as ``[k, out, in]`` views (bias as the last column; no
    copy: for a big model ``k x P`` is gigabytes), made once per score pass by
    :meth:`BlockGradSolver.prepare_queries`. One-position blocks (plain Linear) score fastest from contiguous
    weight / bias parts, which :meth:`split` makes on first use and keeps."""

    def __init__(self, k: int, blocks: list[torch.Tensor]):
        self.k, self.blocks = k, blocks
        self._split: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return self.k

    def split(self, i: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Contiguous ``(weight [k, out, in - 1], bias [k, out])`` of block ``i`` (``(weight, None)`` without bias)."""
        if i not in self._split:
            Q = self.blocks[i]
            self._split[i] = (Q[..., :-1].contiguous(), Q[..., -1].contiguous()) if bias else (Q.contiguous(), None)
        return self._split[i]


class BlockGradSolver(Solver):
    """A solver whose training gradients, pairwise scores and self-influence come from captured ``a``/``s``."""

    # -- gradients of a batch, block by block ------------------------------------------------------------
    @contextmanager
    def _captured(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  generator: torch.Generator | None = None) -> Iterator[Capture]:
        """Run forward + backward of the summed per-example loss; yields the captured a / s per block.
        With a ``generator`` and ``curvature="fisher"``, targets are sampled from the model's own predictions."""
        assert self.layout is not None
        with Capture(self.layout.modules, self.layout.blocks, self.dtype) as cap, torch.enable_grad():
            params = list(model.parameters())
            req = [p.requires_grad for p in params]
            for p in params:  # gradients w.r.t. outputs only: no parameter .grad is touched
                p.requires_grad_(False)
            try:
                x = x.to(self.device, self.dtype).requires_grad_(True)
                with self.amp():
                    out = model(x).to(self.dtype)
                if generator is not None and self.curvature == "fisher":
                    y = self.task.sample_targets(out.detach(), generator)
                self.task.loss(out, y.to(self.device)).sum().backward()
            finally:
                for p, r in zip(params, req, strict=True):
                    p.requires_grad_(r)
            yield cap

    def _block_grads(self, cap: Capture, blk: Block) -> torch.Tensor:
        """Per-example gradients ``[b, out, in]`` of one block (bias gradient as the last column)."""
        a, s = cap.a[blk.name], cap.s[blk.name]
        g = torch.bmm(s.transpose(1, 2), a)
        return torch.cat([g, s.sum(1, keepdim=True).transpose(1, 2)], dim=2) if blk.bias is not None else g

    # -- scoring ---------------------------------------------------------------------------------------------
    def train_grads(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Flat ``[b, P]``, each block written into its slice (no list of blocks concatenated: one copy, not two)."""
        assert self.layout is not None
        with self._captured(model, x, y) as cap:
            out = torch.empty(len(x), self.layout.size, dtype=self.dtype, device=self.device)
            for b in self.layout.blocks:
                self.layout.block(out, b).copy_(self._block_grads(cap, b))
            return out

    def prepare_queries(self, preconditioned: torch.Tensor) -> PreparedQueries:
        """Per-block ``[k, out, in]`` views of the preconditioned queries (see :class:`PreparedQueries`)."""
        assert self.layout is not None
        pre = preconditioned.to(self.dtype)
        return PreparedQueries(len(pre), [self.layout.block(pre, b) for b in self.layout.blocks])

    def pairwise(self, model: nn.Module, preconditioned: torch.Tensor | PreparedQueries, x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        """Block by block, without concatenating per-example gradients; one-position blocks (plain Linear)
        use ``s^T Q a`` and never form ``s a^T``."""
        assert self.layout is not None
        prepared = preconditioned if isinstance(preconditioned, PreparedQueries) else \
            self.prepare_queries(preconditioned)
        k = len(prepared)
        out = torch.zeros(k, len(x), dtype=self.dtype, device=self.device)
        with self._captured(model, x, y) as cap:
            for i, (b, Q) in enumerate(zip(self.layout.blocks, prepared.blocks, strict=True)):
                a, s = cap.a[b.name], cap.s[b.name]
                bias = b.bias is not None
                if a.shape[1] == 1:
                    Qw, Qb = prepared.split(i, bias)
                    t = (Qw.reshape(k * b.out_dim, -1) @ a[:, 0].T).view(k, b.out_dim, -1)
                    out += torch.einsum("kob,bo->kb", t, s[:, 0])
                    if Qb is not None:
                        out += Qb @ s[:, 0].T
                else:  # the view [k, out * in] (row stride P) multiplies without a copy
                    g = self._block_grads(cap, b)
                    out += Q.reshape(k, -1) @ g.reshape(len(x), -1).T
        return out

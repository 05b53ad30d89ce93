"""Identity: no curvature at all, so the influence score is the gradient dot product ``g_q^T g_z``
(TracIn-style baseline; self-influence is the squared gradient norm). ``damping`` is accepted and ignored.

Gradients come from the captured block inputs/output-gradients (:mod:`.blocks`), like EK-FAC's: a plain
Linear block's squared gradient norm is ``|s|^2 (|a|^2 + 1)`` and is never formed. Models with a tracked
module the hooks cannot express (grouped convs) fall back to torch.func per-example gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data.base import LabeledData
from .base import Damping, Solver
from .blocks import BlockGradSolver, Capture, capturable
from .layout import Block, ParamLayout


class Identity(BlockGradSolver):
    name = "identity"
    _hooks = True  # set by setup(): False when a tracked module needs the torch.func fallback

    def fit(self, model: nn.Module, data: LabeledData, snapshots=None) -> None:
        """Nothing to fit."""
        if self.layout is None:
            self.setup(model)

    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        return v

    def setup(self, model: nn.Module) -> ParamLayout:
        """As :meth:`Solver.setup`, and decide once whether the hooks can capture every tracked module."""
        layout = super().setup(model)
        self._hooks = all(capturable(m) for m in layout.modules.values())
        return layout

    def train_grads(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().train_grads(model, x, y) if self._hooks else Solver.train_grads(self, model, x, y)

    def prepare_queries(self, preconditioned: torch.Tensor):
        return super().prepare_queries(preconditioned) if self._hooks else preconditioned

    def pairwise(self, model: nn.Module, preconditioned, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._hooks:
            return super().pairwise(model, preconditioned, x, y)
        return Solver.pairwise(self, model, preconditioned, x, y)

    def self_influence(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       dampings: Sequence[Damping]) -> torch.Tensor:
        """``|g|^2`` block by block (the same for every damping): ``[len(dampings), b]``."""
        if not self._hooks:
            return Solver.self_influence(self, model, x, y, dampings)
        assert self.layout is not None
        out = torch.zeros(len(y), dtype=torch.float64, device=self.device)

        def score(cap: Capture, i: int, b: Block) -> None:  # (during the backward pass: see _captured)
            a, s = cap.a[b.name].to(self.dtype), cap.s[b.name].to(self.dtype)  # (stored bf16 under autocast)
            if a.shape[1] == 1:
                a2 = a[:, 0].square().sum(1) + (1.0 if b.bias is not None else 0.0)
                out.add_((s[:, 0].square().sum(1) * a2).double())
            else:
                out.add_(self._block_grads(cap, b).to(self.dtype).square().sum((1, 2)).double())

        self._each_block(model, x, y, score)
        return out.to(self.dtype).expand(len(dampings), -1).clone()

"""Identity: no curvature at all, so the influence score is the gradient dot product ``g_q^T g_z``
(TracIn-style baseline; self-influence is the squared gradient norm). ``damping`` is accepted and ignored."""

from __future__ import annotations

import torch
from torch import nn

from ..data.base import LabeledData
from .base import Damping, Solver


class Identity(Solver):
    name = "identity"

    def fit(self, model: nn.Module, data: LabeledData) -> None:
        """Nothing to fit."""
        if self.layout is None:
            self.setup(model)

    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        return v

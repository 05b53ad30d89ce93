"""Per-example gradients (torch.func) and the label conventions of the curvature.

The influence loss is the per-example cross-entropy. ``curvature="fisher"`` (the default, true Fisher =
GGN for cross-entropy) uses labels sampled from the model's own predictive distribution wherever a
solver estimates the curvature from gradients; ``empirical_fisher`` uses the training labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .layout import ParamLayout


def split_params(model: nn.Module, layout: ParamLayout) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tracked parameters, everything else incl. buffers), detached, for ``functional_call``."""
    tracked = set(layout.param_names)
    params = {n: p.detach() for n, p in model.named_parameters() if n in tracked}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in tracked}
    rest.update({n: b for n, b in model.named_buffers()})
    return params, rest


def per_sample_grads(model: nn.Module, layout: ParamLayout, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Flat ``[b, P]`` gradients of each example's cross-entropy loss w.r.t. the tracked parameters.

    The model must be in eval mode (BatchNorm running statistics, no dropout).
    """
    params, rest = split_params(model, layout)

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**p, **rest}, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return layout.flatten(g)


@torch.no_grad()
def sample_labels(model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution (true-Fisher convention)."""
    probs = torch.softmax(model(x).double(), dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(x.device)


def fisher_labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor, curvature: str,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Labels to build curvature gradients with: sampled for ``fisher``, the data's for ``empirical_fisher``."""
    return sample_labels(model, x, generator) if curvature == "fisher" else y

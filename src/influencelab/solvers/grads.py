"""Per-example gradients (torch.func) of a per-example loss (the task's, :mod:`influencelab.tasks`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..tasks import ClassificationTask
from .layout import ParamLayout


def split_params(model: nn.Module, layout: ParamLayout) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tracked parameters, everything else incl. buffers), detached, for ``functional_call``."""
    tracked = set(layout.param_names)
    params = {n: p.detach() for n, p in model.named_parameters() if n in tracked}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in tracked}
    rest.update({n: b for n, b in model.named_buffers()})
    return params, rest


def per_sample_grads(model: nn.Module, layout: ParamLayout, x: torch.Tensor, y: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Flat ``[b, P]`` gradients of each example's loss (``loss_fn(output, target) -> [b]``; cross-entropy by
    default) w.r.t. the tracked parameters. The model must be in eval mode (BatchNorm running statistics, no
    dropout)."""
    params, rest = split_params(model, layout)
    fn = loss_fn or ClassificationTask().loss

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**p, **rest}, (xi.unsqueeze(0),))
        return fn(out, yi.unsqueeze(0)).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return layout.flatten(g)

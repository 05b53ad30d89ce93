"""Per-example gradients (torch.func) of a per-example loss (the task's, :mod:`influencelab.tasks`), on batches of any
structure: the task calls the model (:meth:`~influencelab.tasks.Task.forward`) on the batch's inputs (a tensor, or a
dict / tuple of tensors such as ``input_ids`` and ``attention_mask``), vmapped over the examples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..data.base import map_batch
from ..tasks import ClassificationTask, Task
from .layout import ParamLayout


def split_params(model: nn.Module, layout: ParamLayout) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tracked parameters, everything else incl. buffers), detached, for ``functional_call``."""
    tracked = set(layout.param_names)
    params = {n: p.detach() for n, p in model.named_parameters() if n in tracked}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in tracked}
    rest.update({n: b for n, b in model.named_buffers()})
    return params, rest


class _TaskForward(nn.Module):
    """``task.forward(model, inputs)`` as a module holding ``model`` (its parameters under ``model.``), so that
    ``functional_call`` can run a task's own forward with the parameters replaced."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.task.forward(self.model, inputs)


def functional_forward(task: Task, model: nn.Module, params: dict[str, torch.Tensor], inputs: Any) -> torch.Tensor:
    """``task.forward(model, inputs)`` with the model's parameters and buffers taken from ``params``."""
    if type(task).forward is Task.forward and isinstance(inputs, torch.Tensor):
        return functional_call(model, params, (inputs,))  # (the plain call, as before tasks owned the forward)
    return functional_call(_TaskForward(model, task), {f"model.{k}": v for k, v in params.items()}, (inputs,))


def per_sample_grads(model: nn.Module, layout: ParamLayout, x: Any, y: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     task: Task | None = None) -> torch.Tensor:
    """Flat ``[b, P]`` gradients of each example's loss (``loss_fn(output, target) -> [b]``; the task's loss by
    default, cross-entropy without a task) w.r.t. the tracked parameters. ``x``: the batch's inputs (a tensor or a
    dict / tuple of tensors, examples along dim 0), called through ``task.forward``; ``y``: its targets. The model
    must be in eval mode (BatchNorm running statistics, no dropout)."""
    params, rest = split_params(model, layout)
    task = task if task is not None else ClassificationTask()
    fn = loss_fn or task.loss

    def loss(p: dict[str, torch.Tensor], xi: Any, yi: torch.Tensor) -> torch.Tensor:
        out = functional_forward(task, model, {**p, **rest}, map_batch(lambda t: t.unsqueeze(0), xi))
        return fn(out, yi.unsqueeze(0)).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return layout.flatten(g)

"""Exact curvature of the task's per-example loss (:mod:`influencelab.tasks`; cross-entropy by default) w.r.t.
the tracked parameters, with torch.func.

* products ``G v`` for many flat vectors ``V [k, P]`` at once (vmapped), averaged over a batch:
  ``fisher`` (= GGN ``J^T H_out J v``; for cross-entropy ``H_out = diag p - p p^T``), ``empirical_fisher``
  (``mean_i g_i g_i^T v``) and ``hessian`` (forward-over-reverse);
* dense matrices of the same (tiny models only), accumulated over a dataset;
* the data-set mean of products (for CG) and a trace estimate (for ``damping="auto"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from .. import distributed
from ..data.base import LabeledData
from ..tasks import Task, resolve_task
from .grads import per_sample_grads, split_params
from .layout import ParamLayout

KINDS = ("fisher", "empirical_fisher", "hessian")


class Curvature:
    """Curvature products and dense blocks of ``model`` on the tracked parameters of ``layout``."""

    def __init__(self, model: nn.Module, layout: ParamLayout, kind: str, task: Task | None = None):
        assert kind in KINDS, kind
        self.model, self.layout, self.kind = model, layout, kind
        self.task = resolve_task(task)
        self.params, self.rest = split_params(model, layout)
        self.dtype = next(iter(self.params.values())).dtype
        self.device = next(iter(self.params.values())).device

    def _logits(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**p, **self.rest}, (x,))

    def _tangents(self, V: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.unflatten(V.to(self.dtype), self.model)

    # -- products ----------------------------------------------------------------------------------------
    def product(self, V: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``mean_i C_i V^T`` for ``V [k, P]`` over the batch ``(x, y)``: returns ``[k, P]``. Under torchrun,
        inside a :func:`distributed.collective` section, each rank takes a share of the batch (all-reduced)."""
        if distributed.split_batch():
            rows = distributed.shard(len(x))
            part = self._product(V, x[rows], y[rows]) * len(rows) if len(rows) else torch.zeros_like(V)
            return distributed.all_reduce_sum(part) / len(x)
        return self._product(V, x, y)

    def _product(self, V: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.to(self.device, self.dtype), y.to(self.device)
        if self.kind == "empirical_fisher":
            g = per_sample_grads(self.model, self.layout, x, y, self.task.loss)
            return ((V.to(g.dtype) @ g.T) @ g) / len(x)
        tangents = self._tangents(V)
        if self.kind == "hessian":
            def loss(p):
                return self.task.loss(self._logits(p, x), y).mean()

            def hvp(t):
                return jvp(grad(loss), (self.params,), (t,))[1]

            return self.layout.flatten(vmap(hvp)(tangents))
        out, pull = vjp(lambda p: self._logits(p, x), self.params)
        out = out.detach()

        def ggn(t):
            ju = jvp(lambda p: self._logits(p, x), (self.params,), (t,))[1]
            return pull(self.task.output_hessian_product(out, ju) / len(x))[0]

        return self.layout.flatten(vmap(ggn)(tangents))

    def mean_product(self, V: torch.Tensor, data: LabeledData, batch_size: int) -> torch.Tensor:
        """``G V`` with ``G`` the mean curvature over the whole of ``data`` (streamed in batches)."""
        total = torch.zeros_like(V)
        for x, y, _ in data.batches(batch_size):
            total += self.product(V, x, y) * len(x)
        return total / len(data)

    # -- dense ------------------------------------------------------------------------------------------------
    def dense(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The dense ``[P, P]`` mean curvature of one batch."""
        x, y = x.to(self.device, self.dtype), y.to(self.device)
        if self.kind == "empirical_fisher":
            g = per_sample_grads(self.model, self.layout, x, y, self.task.loss)
            return g.T @ g / len(x)
        if self.kind == "hessian":
            names = list(self.params)
            shapes = [self.params[n].shape for n in names]
            sizes = [self.params[n].numel() for n in names]

            def loss_flat(theta: torch.Tensor) -> torch.Tensor:
                p = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)}
                return self.task.loss(self._logits(p, x), y).mean()

            theta = torch.cat([self.params[n].reshape(-1) for n in names])
            h = torch.func.hessian(loss_flat)(theta)  # in parameter order; map to the block layout
            perm = self._param_to_layout(names, shapes)
            return h[perm][:, perm]

        def logits_one(p, xi):
            return self._logits(p, xi.unsqueeze(0))[0]

        jac = vmap(jacrev(logits_one), in_dims=(None, 0))(self.params, x)  # {name: [b, C, *shape]}
        b, c = len(x), next(iter(jac.values())).shape[1]
        J = self.layout.flatten({n: j.reshape(b * c, *j.shape[2:]) for n, j in jac.items()}).reshape(b, c, -1)
        H = self.task.output_hessian(self._logits(self.params, x).detach())
        return torch.einsum("bcp,bcd,bdq->pq", J, H, J) / b

    def _param_to_layout(self, names: list[str], shapes: list[torch.Size]) -> torch.Tensor:
        """Index permutation taking the concatenated-parameters order to the block layout."""
        sizes = [s.numel() for s in shapes]
        offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist(), strict=False))
        idx = {n: (torch.arange(s.numel()) + offsets[n]).reshape(1, *s) for n, s in zip(names, shapes, strict=True)}
        return self.layout.flatten(idx)[0].long()

    def dense_mean(self, data: LabeledData, batch_size: int) -> torch.Tensor:
        """Dense mean curvature over all of ``data``, in float64."""
        P = self.layout.size
        G = torch.zeros(P, P, dtype=torch.float64, device=self.device)
        for x, y, _ in data.batches(batch_size):
            G += self.dense(x, y).double() * len(x)
        return G / len(data)

    def trace_estimate(self, data: LabeledData, batch_size: int, probes: int = 16, seed: int = 0,
                       max_batches: int = 8) -> float:
        """Hutchinson estimate of ``trace(G)`` from a few batches (for ``damping="auto"``)."""
        gen = torch.Generator().manual_seed(seed)
        V = (torch.randint(0, 2, (probes, self.layout.size), generator=gen) * 2 - 1).to(self.device, self.dtype)
        total, n = 0.0, 0
        for i, (x, y, _) in enumerate(data.batches(batch_size, shuffle=True, seed=seed)):
            if i >= max_batches:
                break
            total += float((self.product(V, x, y) * V).sum(1).mean()) * len(x)
            n += len(x)
        return total / max(n, 1)


def product_fn(curv: Curvature, data: LabeledData, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V -> G V`` over the whole data set."""
    return lambda V: curv.mean_product(V, data, batch_size)

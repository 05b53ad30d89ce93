"""Exact curvature of the task's per-example loss (:mod:`influencelab.tasks`; cross-entropy by default) w.r.t.
the tracked parameters, with torch.func.

* products ``G v`` for many flat vectors ``V [k, P]`` at once (vmapped), averaged over a batch:
  ``fisher`` (= GGN ``J^T H_out J v``; for cross-entropy ``H_out = diag p - p p^T``), ``empirical_fisher``
  (``mean_i g_i g_i^T v``) and ``hessian`` (forward-over-reverse);
* dense matrices of the same (tiny models only), accumulated over a dataset;
* the data-set mean of products (for CG) and a trace estimate (for ``damping="auto"``).

The data-set mean of ``fisher`` products (CG's every iteration) has a second, faster path: the per-example output
Jacobians ``J_i [C, P]`` of each batch, formed once (``C`` backward passes per example, vmapped) and kept in memory
up to ``jacobian_cache_bytes``, make every later product two matrix products, ``J^T H_out (J V^T)``, for all ``k``
vectors at once, instead of ``k`` jvp/vjp passes through the network per iteration (on the section 3 CNN, 500
points: 4.3x faster per product of 8 vectors, 18x for 100, no gain for 1, after 6.8 s to form them;
``benchmarks/bench_cg_products.py``). When they do not fit, the jvp/vjp path is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import grad, jacrev, jvp, vjp, vmap

from .. import distributed
from ..data.base import LabeledData, batch_to, index_batch, map_batch
from ..tasks import Task, resolve_task
from .grads import functional_forward, per_sample_grads, split_params
from .layout import ParamLayout

KINDS = ("fisher", "empirical_fisher", "hessian")


def load_jvp_decompositions() -> None:
    """Load what torch's forward-mode AD (``jvp``) loads on its first use, with that load's one warning silenced:
    ``torch._decomp.decompositions_for_jvp`` scripts its decompositions with ``torch.jit.script``, which warns
    (``FutureWarning: torch.jit.script is deprecated``) from inside torch in every LiSSA/CG run. Only that message
    from that import is filtered; later imports are no-ops."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        from torch._decomp import decompositions_for_jvp  # noqa: F401


class Curvature:
    """Curvature products and dense blocks of ``model`` on the tracked parameters of ``layout``."""

    def __init__(self, model: nn.Module, layout: ParamLayout, kind: str, task: Task | None = None,
                 jacobian_cache_bytes: float = 0):
        load_jvp_decompositions()  # (before the first jvp: else torch's import warns about torch.jit.script)
        assert kind in KINDS, kind
        self.model, self.layout, self.kind = model, layout, kind
        self.jacobian_cache_bytes = jacobian_cache_bytes
        self._jacobians: tuple[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None] | None = None
        self.task = resolve_task(task)
        self.params, self.rest = split_params(model, layout)
        self.dtype = next(iter(self.params.values())).dtype
        self.device = next(iter(self.params.values())).device

    def _logits(self, p: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
        """The model's output on the batch inputs ``x`` (through the task's forward) at parameters ``p``."""
        return functional_forward(self.task, self.model, {**p, **self.rest}, x)

    def _tangents(self, V: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.unflatten(V.to(self.dtype), self.model)

    # -- products ----------------------------------------------------------------------------------------
    def product(self, V: torch.Tensor, x: Any, y: torch.Tensor) -> torch.Tensor:
        """``mean_i C_i V^T`` for ``V [k, P]`` over the batch ``(x, y)`` (inputs and targets, as the data's
        ``batches`` yield them): returns ``[k, P]``. Under torchrun, inside a :func:`distributed.collective`
        section, each rank takes a share of the batch (all-reduced)."""
        if distributed.split_batch():
            rows = distributed.shard(len(y))
            part = self._product(V, index_batch(x, rows), y[rows]) * len(rows) if len(rows) else torch.zeros_like(V)
            return distributed.all_reduce_sum(part) / len(y)
        return self._product(V, x, y)

    def _product(self, V: torch.Tensor, x: Any, y: torch.Tensor) -> torch.Tensor:
        x, y = batch_to(x, self.device, self.dtype), y.to(self.device)
        if self.kind == "empirical_fisher":
            g = per_sample_grads(self.model, self.layout, x, y, self.task.loss, self.task)
            return ((V.to(g.dtype) @ g.T) @ g) / len(y)
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
            return pull(self.task.loss_hessian_product(out, y, ju) / len(y))[0]

        return self.layout.flatten(vmap(ggn)(tangents))

    def mean_product(self, V: torch.Tensor, data: LabeledData, batch_size: int) -> torch.Tensor:
        """``G V`` with ``G`` the mean curvature over the whole of ``data`` (streamed in batches); ``fisher``
        products go through the batches' output Jacobians when they fit in ``jacobian_cache_bytes`` (module
        docstring; the cache assumes the model is not changed between products)."""
        total = torch.zeros_like(V)
        cached = self._cached_jacobians(data, batch_size)
        if cached is not None:
            for J, out, y in cached:
                total += self._jacobian_product(V, J, out, y) * len(out)
            return total / len(data)
        for x, y, _ in data.batches(batch_size):
            total += self.product(V, x, y) * len(y)
        return total / len(data)

    # -- per-example output Jacobians (fisher / GGN) ---------------------------------------------------------
    def output_jacobian(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(J [b, C, P], outputs [b, ...])``: each example's output Jacobian w.r.t. the tracked parameters, in the
        block layout (``C``: the outputs of one example, e.g. ``T x V`` logits of a sequence, flattened), and the
        (detached) outputs."""
        x = batch_to(x, self.device, self.dtype)

        def logits_one(p, xi):
            return self._logits(p, map_batch(lambda t: t.unsqueeze(0), xi)).reshape(-1)

        jac = vmap(jacrev(logits_one), in_dims=(None, 0))(self.params, x)  # {name: [b, C, *shape]}
        b, c = next(iter(jac.values())).shape[:2]
        J = self.layout.flatten({n: j.reshape(b * c, *j.shape[2:]) for n, j in jac.items()}).reshape(b, c, -1)
        return J, self._logits(self.params, x).detach()

    def _jacobian_product(self, V: torch.Tensor, J: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``mean_i J_i^T H_i J_i V^T`` over one batch, ``[k, P]``, from its Jacobians ``J [b, C, P]``, outputs
        ``out [b, ...]`` and targets ``y``."""
        b, c, P = J.shape
        Jm = J.reshape(b * c, P)
        U = (Jm @ V.to(J.dtype).T).reshape(b, c, -1).permute(2, 0, 1)  # [k, b, C]: J_i v per example
        HU = self.task.loss_hessian_product(out, y, U.reshape(len(U), *out.shape))  # broadcast over the k vectors
        return (HU.reshape(len(U), b, c).permute(1, 2, 0).reshape(b * c, -1).T @ Jm) / b

    def _cached_jacobians(self, data: LabeledData, batch_size: int
                          ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
        """The Jacobians of every batch of ``data``, formed on first use and kept while all of them fit in
        ``jacobian_cache_bytes``; ``None`` when they do not (or for another curvature / under torchrun)."""
        if self.kind != "fisher" or self.jacobian_cache_bytes <= 0 or distributed.split_batch():
            return None
        key = (id(data), batch_size)
        if self._jacobians is None or self._jacobians[0] != key:
            x = batch_to(index_batch(next(iter(data.batches(batch_size)))[0], slice(0, 1)), self.device, self.dtype)
            c = self._logits(self.params, x).numel()  # outputs per example
            fits = len(data) * c * self.layout.size * torch.finfo(self.dtype).bits // 8 <= self.jacobian_cache_bytes
            self._jacobians = (key, [(*self.output_jacobian(x), y.to(self.device))
                                     for x, y, _ in data.batches(batch_size)] if fits else None)
        return self._jacobians[1]

    # -- dense ------------------------------------------------------------------------------------------------
    def dense(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        """The dense ``[P, P]`` mean curvature of one batch."""
        x, y = batch_to(x, self.device, self.dtype), y.to(self.device)
        if self.kind == "empirical_fisher":
            g = per_sample_grads(self.model, self.layout, x, y, self.task.loss, self.task)
            return g.T @ g / len(y)
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

        J, out = self.output_jacobian(x)
        H = self.task.loss_hessian(out, y)
        return torch.einsum("bcp,bcd,bdq->pq", J, H, J) / len(y)

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
            G += self.dense(x, y).double() * len(y)
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
            total += float((self.product(V, x, y) * V).sum(1).mean()) * len(y)
            n += len(y)
        return total / max(n, 1)


def product_fn(curv: Curvature, data: LabeledData, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V -> G V`` over the whole data set."""
    return lambda V: curv.mean_product(V, data, batch_size)

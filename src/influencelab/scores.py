"""Pairwise and self-influence scores, streamed over the training set in cached, resumable chunks.

Training gradients are computed batch by batch and never all held in memory; query gradients are
preconditioned once per damping. Each chunk of ``chunk_size`` training points is written atomically to
the cache as soon as it is done (:meth:`Artifacts.chunked`), so an interrupted run resumes from its last
finished chunk and gives identical results (chunks do not depend on each other).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from . import distributed
from .artifacts import Artifacts
from .data.base import LabeledData
from .errors import ConfigError, SolverDivergedError
from .solvers.base import Damping, Solver, diagnostics_from_json, diagnostics_json, merge_diagnostics
from .solvers.blocks import BlockGradSolver

log = logging.getLogger(__name__)


def finite_or_raise(t: torch.Tensor, what: str, solver: Solver) -> None:
    """A diverged solver is reported with a suggestion instead of returning NaN/inf scores. The sum is finite when
    every entry is (it can overflow only past 3e38 in float32, and is then checked entry by entry): ``isfinite`` of a
    ``[n_query, P]`` matrix would allocate 1.5 copies of it."""
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise SolverDivergedError(
            f"{solver.name} produced NaN/inf {what}; increase solver.damping (now {solver.dampings}) "
            f"or use solver.dtype=float64{' or a larger solver.scale' if solver.name == 'lissa' else ''}")


def query_gradients(solver: Solver, model: nn.Module, queries: LabeledData, batch_size: int) -> torch.Tensor:
    """Flat gradients ``[n_query, P]`` of the queries' measurement (the task's; their loss by default), written batch
    by batch into one preallocated matrix (for a big model ``n_query x P`` is gigabytes: no concatenated copy). The
    block-hook solvers write each batch's blocks straight into its rows (no ``[batch, P]`` copy beside them)."""
    out: torch.Tensor | None = None
    if (solver.task.measures_loss and type(solver).query_grads is Solver.query_grads
            and type(solver).train_grads is BlockGradSolver.train_grads):
        assert solver.layout is not None
        out = torch.empty(len(queries), solver.layout.size, dtype=solver.store_dtype, device=solver.device)
        for x, y, pos in queries.batches(batch_size):  # (unshuffled: each batch is a contiguous range of rows)
            solver.train_grads(model, x, y, out=out[int(pos[0]):int(pos[0]) + len(pos)])
        return out
    for x, y, pos in queries.batches(batch_size):
        g = solver.query_grads(model, x, y)
        if out is None:
            if len(g) == len(queries):
                return g
            out = g.new_empty(len(queries), g.shape[1])
        out[pos.to(out.device)] = g
    assert out is not None, "no queries"
    return out


def precondition_queries(solver: Solver, grads: torch.Tensor, dampings: Sequence[Damping],
                         consume: bool = False) -> torch.Tensor:
    """``[n_damping * n_query, P]``: each damping's ``(G + λI)^-1 g_q``, stacked damping-major (every rank
    solves the same queries, so curvature products are split across torchrun ranks). ``consume``: ``grads`` is
    not needed afterwards, so one damping is solved in place (:meth:`Solver.precondition_`)."""
    with distributed.collective():
        if consume and len(dampings) == 1:
            pre = solver.precondition_(grads, dampings[0])
        elif len(dampings) > 1 and type(solver).precondition_all is Solver.precondition_all:
            # each damping solved into its row of one [n_damping, k, P] (not a list of copies, then stacked)
            pre = grads.new_empty(len(dampings), *grads.shape)
            for j, d in enumerate(dampings):
                solver.precondition_(pre[j].copy_(grads), d)
            pre = pre.flatten(0, 1)
        else:
            pre = solver.precondition_all(grads, dampings).flatten(0, 1)
    finite_or_raise(pre, "preconditioned query gradients", solver)
    return pre


def compress(preconditioned: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Optional low-rank compression of preconditioned queries ``[k, P] ~ coef [k, r] @ basis [r, P]``.

    Scoring then costs ``r`` instead of ``k`` products per training gradient and holds ``r x P`` instead of
    ``k x P``; ``rank=None`` (or >= k) keeps them exact (returns the matrix itself and ``None``)."""
    if rank is None or rank >= min(preconditioned.shape):
        return preconditioned, None
    u, s, vh = torch.linalg.svd(preconditioned.double(), full_matrices=False)
    return vh[:rank].to(preconditioned.dtype), (u[:, :rank] * s[:rank]).to(preconditioned.dtype)


def parse_partition(spec: str | Sequence[int] | None, key: str = "score.partition") -> tuple[int, int]:
    """A partition: ``None`` (everything: ``(0, 1)``), ``"i/k"`` (the CLI's ``score.partition``) or ``(i, k)`` (the
    API's): the i-th of k disjoint shares of the score chunks, 0-based. ``key`` names it in the error."""
    if spec in (None, "", "null"):
        return 0, 1
    try:
        i, k = (int(v) for v in (str(spec).split("/") if isinstance(spec, str) else spec))
        assert 0 <= i < k
    except (ValueError, TypeError, AssertionError):
        form, example = ("i/k", "0/4") if isinstance(spec, str) else ("(i, k)", "(0, 4)")
        raise ConfigError(f"{key}={spec!r} is invalid: use {form} with 0 <= i < k, e.g. {example}") from None
    return i, k


def pairwise_scores(solver: Solver, model: nn.Module, train: LabeledData, preconditioned: torch.Tensor,
                    artifacts: Artifacts, key: str, batch_size: int = 256, chunk_size: int = 4096,
                    partition: tuple[int, int] = (0, 1), rank: int | None = None,
                    fitted: bool = False) -> torch.Tensor | None:
    """Scores ``[rows of preconditioned, n_train]``; ``preconditioned`` from :func:`precondition_queries`
    (optionally compressed to ``rank``, see :func:`compress`). ``fitted``: ``train`` is the data the solver was
    fitted on, so what its fit kept may serve (:meth:`~influencelab.solvers.base.Solver.pairwise_fitted`)."""
    basis, coef = compress(preconditioned, rank)
    prepared = solver.prepare_queries(basis)  # once per pass, not per batch

    def compute(s: int, e: int) -> torch.Tensor:
        out = solver.pairwise_fitted(prepared, torch.arange(s, e)) if fitted else None
        if out is None:
            part = train.subset(torch.arange(s, e))
            out = torch.cat([solver.pairwise(model, prepared, x, y).detach() for x, y, _ in part.batches(batch_size)],
                            dim=1)
        out = (out if coef is None else coef @ out).cpu()
        finite_or_raise(out, "pairwise scores", solver)
        return out

    return artifacts.chunked("pairwise", key, len(train), chunk_size, compute, partition)


def self_scores(solver: Solver, model: nn.Module, train: LabeledData, dampings: Sequence[Damping],
                artifacts: Artifacts, key: str, batch_size: int = 256, chunk_size: int = 4096,
                partition: tuple[int, int] = (0, 1)) -> torch.Tensor | None:
    """Self-influence ``[n_damping, n_train]``: ``g_z^T (G + λI)^-1 g_z`` for every training point."""

    def compute(s: int, e: int) -> torch.Tensor:
        solver.reset_diagnostics()  # this chunk's convergence is cached with it (iterative solvers)
        part = train.subset(torch.arange(s, e))
        cols = [solver.self_influence(model, x, y, dampings).detach().cpu() for x, y, _ in part.batches(batch_size)]
        out = torch.cat(cols, dim=1)
        finite_or_raise(out, "self-influence scores", solver)
        return out

    metas: list[dict] = []
    out = artifacts.chunked("self", key, len(train), chunk_size, compute, partition,
                            meta=lambda: {"convergence": diagnostics_json(solver.diagnostics())}, metas=metas)
    unknown = sum("convergence" not in m for m in metas)
    if unknown and solver.iteration_key is not None:
        log.warning("%d of %d cached self-influence chunks predate convergence records: their convergence is "
                    "unknown (clear the cache's self/ entries to recompute them)", unknown, len(metas))
    # the solver's record: the worst over every chunk, cached ones included (per training batch, each damping)
    solver.set_diagnostics(merge_diagnostics(*(diagnostics_from_json(m.get("convergence", {}), dampings)
                                               for m in metas)))
    return out

"""Multi-process support on torch.distributed (``torchrun --nproc_per_node=N -m influencelab ...``).

Work is split by rank and summed with all-reduce (curvature statistics; curvature-vector products inside
:func:`collective` sections, where every rank solves the same vectors: fitting and query preconditioning) or
split by chunks of training points that each rank writes to the shared cache (scores); rank 0 alone
writes the run directory and logs to W&B. Without torchrun every function here is a cheap no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


def maybe_init(device: torch.device) -> None:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); gloo on CPU, nccl on CUDA."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(minutes=60))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (returns it)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard(n: int) -> torch.Tensor:
    """This rank's contiguous share of ``range(n)`` (the last ranks may get one fewer)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return torch.arange(start, start + base + (1 if r < extra else 0))


_collective = False


@contextmanager
def collective() -> Iterator[None]:
    """A section that every rank runs on the same inputs in lockstep, so the curvature-vector products inside
    it may split their batch across ranks and all-reduce (used for fitting and for preconditioning queries;
    not for per-chunk training scores, where ranks already work on different data)."""
    global _collective
    before, _collective = _collective, True
    try:
        yield
    finally:
        _collective = before


def split_batch() -> bool:
    """Whether batch-level work should be split across ranks right now (inside :func:`collective`)."""
    return _collective and active()

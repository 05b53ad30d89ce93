"""The memory budget of a scoring pass (``score.memory_gb``, the API's ``memory_gb=``): a planner that estimates what
a pairwise or self-influence pass holds and picks the largest query chunk and training batch that fit.

What a pass holds, in numbers of the solver's dtype (``P``: tracked parameters; ``q``: queries of a chunk;
``k = n_damping x q``: preconditioned rows; ``b``: training examples per batch); gradients and preconditioned
queries in the solver's ``store_dtype`` (the block solvers keep them in bf16 under ``solver.autocast=bf16``):

* **query phase**: the chunk's query gradients ``[q, P]`` (other than the block solvers, which write each batch
  into its rows, a batch of them ``[min(b, q), P]`` being formed beside them), then
  the preconditioned copies: one damping is solved in place (``[q, P]``), several fill ``[n_damping, q, P]`` beside
  the gradients; plus the solver's own work space (EK-FAC/K-FAC: a few ``[rows, out, in]`` of the largest block,
  its rows within :data:`~influencelab.solvers.ekfac.CHUNK_BYTES`;
  identity: none; any other solver: :data:`WORK_COPIES` copies of ``[q, P]``);
* **training phase**: ``[k, P]`` preconditioned queries, plus the contiguous copies that the block solvers make of
  one-position blocks (plain Linear layers: their share of ``[k, P]`` again); per batch the activations
  (:func:`probe`: every leaf module's output for one example, x :data:`ACTIVATION_FACTOR`) and the per-block work
  (one-position blocks ``[b, k, out]``, others the per-example gradients ``[b, out, in]`` twice; solvers without
  block hooks ``[b, P]`` three times); the score columns of a cached chunk ``[k, chunk]`` twice; on the CPU also the
  scores themselves: the chunk's ``[k, n_train]`` twice (its parts and their concatenation) and, when queries are
  chunked, the whole ``[n_damping, n_query, n_train]`` they are assembled into (on a GPU the scores go to host
  memory, which the device budget does not count).

The estimate is that of the pass's additions to what is already held (the model, the fitted factors, the data),
with :data:`RESERVE` (the CPU: :data:`RESERVE_CPU`) on top; its peak is the largest phase. On the CPU the memory each phase frees is handed back to
the system before the next (:func:`release_freed`), so that heap holes do not add up over query chunks. Without a budget the planner takes the memory the
device has free: on CUDA ``torch.cuda.mem_get_info`` plus what this process's caching allocator holds unused; on
the CPU the available memory (``psutil.virtual_memory().available``, else ``MemAvailable`` of ``/proc/meminfo``;
unbounded where neither exists). The plan prefers all queries at once (one pass over the training data) with the
training batch halved down to :data:`MIN_BATCH`, then the largest balanced query chunk, then smaller batches; a
pass that does not fit with 1 query and batch 1 is a one-line :class:`~influencelab.errors.ConfigError` naming the
smallest budget that would work, before anything is computed. Query chunks score exactly as the whole (each chunk
is its own pass over the training data; its score chunks are cached under the chunk's own key).
"""

from __future__ import annotations

import ctypes
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data.base import LabeledData, batch_to
from .errors import ConfigError
from .solvers.base import Solver
from .solvers.blocks import BlockGradSolver
from .solvers.ekfac import CHUNK_BYTES, EKFAC, PAIRS_MAX_T, precondition_rows
from .solvers.identity import Identity

log = logging.getLogger("influencelab")

GB = 2**30  # score.memory_gb counts GiB
#: per example, the activations a forward + backward pass holds, in multiples of its leaf modules' outputs (saved
#: for the backward pass, their gradients while it runs, the tracked blocks' captured output gradients)
ACTIVATION_FACTOR = 3
#: solvers other than EK-FAC/K-FAC/identity: their preconditioning work space, in copies of ``[q, P]``
WORK_COPIES = 3
#: headroom on every estimate: allocator fragmentation, BLAS work space, Python objects (fraction, plus bytes)
RESERVE = (0.05, 32 * 2**20)
#: on the CPU, where the heap's reuse varies from run to run: the same bf16 EK-FAC pass planned at 152 MB peaked at
#: 128-182 MB over runs (tests/test_memory_budget.py's bf16 case)
RESERVE_CPU = (0.25, 32 * 2**20)
#: the training batch is first halved down to this (but not below) before queries are chunked
MIN_BATCH = 16


@dataclass(frozen=True)
class Shape:
    """What the planner knows of a pass: sizes, the tracked blocks ``(out, in, positions)`` and the per-example
    activation bytes measured by :func:`probe`."""

    params: int
    itemsize: int
    blocks: tuple[tuple[int, int, int], ...]
    example_bytes: int
    kind: str  # "ekfac" | "identity" | "blocks" (other block-hook solvers) | "generic"
    cpu: bool  # scores are held on the device (CPU) or sent to the host (GPU)
    n_damping: int
    n_train: int
    chunk_size: int
    store_itemsize: int = 0  # bytes of a stored gradient / preconditioned query (bf16 under autocast; 0: itemsize)

    @property
    def g(self) -> int:
        return self.store_itemsize or self.itemsize


@dataclass(frozen=True)
class Plan:
    """A pass's choice: ``query_chunk`` queries at a time (all of them when unchunked), ``batch_size`` training
    examples per batch, the estimated peak ``bytes`` and the ``budget`` it was planned for (``None``: unbounded)."""

    query_chunk: int
    batch_size: int
    bytes: int
    budget: int | None

    def query_slices(self, n: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.query_chunk, n)) for s in range(0, n, self.query_chunk)]


def _gb(n: float) -> str:
    return f"{n / GB:.3g}"


def _gb_up(n: float) -> str:
    """``n`` bytes in GB rounded up to 3 significant digits (a budget that covers ``n``)."""
    x = n / GB
    d = 2 - math.floor(math.log10(x)) if x > 0 else 0
    return f"{math.ceil(x * 10**d) / 10**d:.{max(d, 0)}f}"


def _reserve(b: float, cpu: bool = False) -> int:
    frac, extra = RESERVE_CPU if cpu else RESERVE
    return int(b * (1 + frac) + extra)


def pairwise_bytes(shape: Shape, n_query: int, q: int, b: int) -> int:
    """Estimated peak bytes of a pairwise pass over ``n_query`` queries, ``q`` at a time, batch ``b``."""
    s, g, P, nd = shape.itemsize, shape.g, shape.params, shape.n_damping
    k = nd * q
    big = max(o * i for o, i, _ in shape.blocks)
    bq = min(b, q)
    # query phase: gradients [q, P] (stored in g bytes) written batch by batch, the block solvers' straight into
    # their rows, each batch's formed block by block (per-example gradients and their bias column: [bq, out, in]
    # twice), then preconditioned (in place for one damping)
    if shape.kind == "generic":
        grads = (q * P * s if q > bq else 0) + 3 * bq * P * s
    else:
        grads = max(q, bq) * P * g + 2 * bq * big * g
    grads += bq * shape.example_bytes
    rows = min(q, precondition_rows(big, s, "cpu" if shape.cpu else "cuda"))  # EK-FAC: a few rows at a time
    # (EK-FAC's products of a few rows: the float32 block, its rotation, the scaled rotation, two products back, the
    # result cast to the stored dtype: up to 6 of [rows, out, in] at once)
    work = {"ekfac": 6 * rows * big * s, "identity": 0}.get(shape.kind, WORK_COPIES * q * P * s)
    precond = q * P * g * (nd + (1 if nd > 1 else 0)) + work
    # training phase: the preconditioned rows, the one-position blocks' contiguous copies, one batch's work
    split = sum(o * i for o, i, t in shape.blocks if t == 1) if shape.kind != "generic" else 0
    held = k * (P + split) * g
    if shape.kind == "generic":
        per_batch = 3 * b * P * s
    else:
        per_batch = max(b * k * o * g if t == 1 else 2 * b * o * i * g for o, i, t in shape.blocks)
    cols = 2 * k * min(shape.chunk_size, shape.n_train) * s + 2 * k * b * s
    train = held + per_batch + b * shape.example_bytes + cols
    if shape.cpu:  # the scores: this chunk's parts and their concatenation, and the whole when queries are chunked
        train += 2 * k * shape.n_train * s + (nd * n_query * shape.n_train * s if q < n_query else 0)
    return _reserve(max(grads, precond, train), shape.cpu)


def self_bytes(shape: Shape, b: int) -> int:
    """Estimated peak bytes of a self-influence pass with batch ``b``."""
    s, P, nd = shape.itemsize, shape.params, shape.n_damping
    if shape.kind == "ekfac":
        per = 0
        for o, i, t in shape.blocks:
            # the rotated factors (and, stored in bf16, their float32 copies)
            rot = (2 if shape.g == s else 3) * b * t * (o + i) * s
            if t <= PAIRS_MAX_T:
                pairs = t * (t + 1) // 2
                extra = 2 * b * pairs * (o + i) * s
            else:
                extra = 2 * min(CHUNK_BYTES["cpu" if shape.cpu else "other"], b * o * i * s) + b * o * i * s
            per = max(per, rot + extra + 2 * nd * o * i * s)
    elif shape.kind in ("identity", "blocks"):
        per = max(3 * b * o * i * s if t > 1 else b * (o + i) * s for o, i, t in shape.blocks)
    else:
        per = (3 + 2 + WORK_COPIES) * b * P * s
    cols = 2 * nd * min(shape.chunk_size, shape.n_train) * 8
    scores = 2 * nd * shape.n_train * s if shape.cpu else 0
    return _reserve(per + b * shape.example_bytes + cols + scores, shape.cpu)


def _kind(solver: Solver) -> str:
    if isinstance(solver, EKFAC):
        return "ekfac"
    if isinstance(solver, Identity):
        return "identity" if solver._hooks else "generic"
    if isinstance(solver, BlockGradSolver) and type(solver).pairwise is BlockGradSolver.pairwise:
        return "blocks"
    return "generic"


def probe(solver: Solver, model: nn.Module, train: Any) -> tuple[tuple[tuple[int, int, int], ...], int]:
    """The tracked blocks ``(out, in, positions)`` and the activation bytes of one example (its leaf modules'
    outputs x :data:`ACTIVATION_FACTOR`), from one forward pass of the first training example (no gradients)."""
    assert solver.layout is not None, "call setup(model) first"
    outputs: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inp, out):
        t = out if isinstance(out, torch.Tensor) else next(
            (o for o in (out if isinstance(out, (tuple, list)) else ()) if isinstance(o, torch.Tensor)), None)
        if t is not None:
            outputs[names[mod]] = outputs.get(names[mod], 0) + t.numel()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        x, _, _ = next(iter(train.subset(torch.arange(1)).batches(1)))
        with torch.no_grad(), solver.amp():
            solver.task.forward(model, batch_to(x, solver.device, solver.dtype))
    finally:
        for h in handles:
            h.remove()
    blocks = tuple((b.out_dim, b.in_dim, max(1, outputs.get(b.name, b.out_dim) // b.out_dim))
                   for b in solver.layout.blocks)
    s = torch.empty((), dtype=solver.dtype).element_size()
    return blocks, ACTIVATION_FACTOR * sum(outputs.values()) * s


def free_bytes(device: torch.device) -> int | None:
    """The memory the device has free for this process: CUDA's free memory plus what this process's caching
    allocator reserved and does not use; the CPU's available memory (``None``: unknown, unbounded)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_budget(memory_gb: Any, key: str = "memory_gb") -> float | None:
    """``memory_gb`` as a float > 0 or ``None``; one-line error otherwise."""
    if memory_gb is None:
        return None
    try:
        value = float(memory_gb)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(memory_gb, bool) or not (0 < value < math.inf):
        raise ConfigError(f"{key}={memory_gb!r} is invalid: give the GB a scoring pass may use (a number > 0), or "
                          f"null for the memory the device has free")
    return value


def shape_of(solver: Solver, model: nn.Module, train: LabeledData, n_damping: int, chunk_size: int) -> Shape:
    assert solver.layout is not None
    blocks, example = probe(solver, model, train)
    return Shape(solver.layout.size, torch.empty((), dtype=solver.dtype).element_size(), blocks, example,
                 _kind(solver), solver.device.type == "cpu", n_damping, len(train), chunk_size,
                 torch.empty((), dtype=solver.store_dtype).element_size())


def _halvings(start: int, stop: int) -> list[int]:
    """``start, start // 2, ...`` while >= ``stop`` (``stop`` itself last when skipped over)."""
    out, b = [], start
    while b > stop:
        out.append(b)
        b //= 2
    return [*out, stop]


def _refuse(what: str, need: int, budget: int, explicit: bool, key: str, how: str) -> ConfigError:
    have = (f"{key}={_gb(budget)} is below it" if explicit else
            f"the device has {_gb(budget)} GB free; free memory or set {key} to try anyway")
    return ConfigError(f"{key}: the {what} pass needs at least {key}={_gb_up(need)} GB ({how}); {have}")


def plan_pairwise(shape: Shape, n_query: int, batch_size: int, budget: int | None, explicit: bool = True,
                  fixed_queries: bool = False, key: str = "memory_gb") -> Plan:
    """The largest query chunk (then training batch) whose estimated peak fits ``budget`` bytes (see the module
    doc); ``fixed_queries``: every query at once (a low-rank compression needs them all)."""
    def fits(q: int, b: int) -> bool:
        return budget is None or pairwise_bytes(shape, n_query, q, b) <= budget

    floor = min(batch_size, MIN_BATCH)
    for b in _halvings(batch_size, floor):  # every query at once, the batch halved down to MIN_BATCH
        if fits(n_query, b):
            return Plan(n_query, b, pairwise_bytes(shape, n_query, n_query, b), budget)
    assert budget is not None
    if not fixed_queries and fits(1, floor):  # the largest chunk at that batch, balanced, then the largest batch
        lo, hi = 1, n_query  # fits(lo), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid, floor) else (lo, mid)
        q = math.ceil(n_query / math.ceil(n_query / lo))
        b = next(b for b in _halvings(batch_size, floor) if fits(q, b))
        return Plan(q, b, pairwise_bytes(shape, n_query, q, b), budget)
    q = n_query if fixed_queries else 1
    for b in _halvings(floor, 1):
        if fits(q, b):
            return Plan(q, b, pairwise_bytes(shape, n_query, q, b), budget)
    how = "every query at once for score.query_rank, batch 1" if fixed_queries else "1 query at a time, batch 1"
    raise _refuse("pairwise", pairwise_bytes(shape, n_query, q, 1), budget, explicit, key, how)


def plan_self(shape: Shape, batch_size: int, budget: int | None, explicit: bool = True,
              key: str = "memory_gb") -> Plan:
    """The largest training batch (halving ``batch_size``) whose estimated self-influence peak fits ``budget``."""
    for b in _halvings(batch_size, 1):
        need = self_bytes(shape, b)
        if budget is None or need <= budget:
            return Plan(0, b, need, budget)
    assert budget is not None
    raise _refuse("self-influence", self_bytes(shape, 1), budget, explicit, key, "batch 1")


def budget_bytes(memory_gb: float | None, device: torch.device) -> tuple[int | None, bool]:
    """The budget in bytes and whether it was given (else the device's free memory, or ``None`` if unknown)."""
    if memory_gb is not None:
        return int(memory_gb * GB), True
    return free_bytes(device), False


_LIBC: Any = None  # glibc once loaded; False where it is not there


def _libc() -> Any:
    """glibc (``None`` where it is not there), loaded once."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 (both must exist)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def release_freed(device: torch.device) -> None:
    """Hand the memory freed by a finished query chunk back to the system (glibc's ``malloc_trim``, CPU only):
    otherwise the holes its ``[k, P]`` pieces leave in the heap stay resident and the next chunk's grow beside
    them (measured: ~90 MB kept per ~110 MB chunk on an MLP). A no-op elsewhere."""
    libc = _libc() if device.type == "cpu" else None
    if libc is not None:
        libc.malloc_trim(0)


#: under an explicit CPU budget, allocations from this size up are mapped (and unmapped when freed) by glibc
MMAP_THRESHOLD = 4 * 2**20
_PINNED = False


def pin_mmap_threshold(device: torch.device) -> None:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (CPU, under an explicit budget; once per process).
    glibc raises the threshold to the size of each mapped block freed (up to 32 MB), after which a pass's
    megabyte-sized work tensors come from the heap, whose holes stay resident: measured, an EK-FAC pass planned at
    152 MB peaked at 207-240 MB that way, and at 131 MB with the threshold fixed. A no-op elsewhere."""
    global _PINNED
    libc = _libc() if device.type == "cpu" and not _PINNED else None
    if libc is not None:
        _PINNED = True
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


def log_plan(what: str, plan: Plan, n_query: int, batch_size: int, explicit: bool) -> None:
    """Say when the budget changed anything (query chunks, a smaller batch); otherwise stay silent (debug)."""
    chunked = plan.query_chunk < n_query
    level = logging.INFO if chunked or plan.batch_size < batch_size else logging.DEBUG
    source = "memory budget" if explicit else "free device memory"
    log.log(level, "%s pass within the %s (%s GB): %s, training batch %d (estimated peak %s GB)", what, source,
            _gb(plan.budget) if plan.budget is not None else "unbounded",
            f"queries {plan.query_chunk} at a time" if chunked else "every query at once", plan.batch_size,
            _gb(plan.bytes))

"""The expensive artefacts of a run, each with the key it is cached by, in one place: trained models, fitted
solver factors and score chunks (ensemble members are trained models with their own seed; partitions are sets of
score chunks). The control flow (the CLI's :class:`~influencelab.pipeline.Context`, the Python
:class:`~influencelab.api.Attributor`) asks for them here; nothing else writes the cache's model, factor or score
entries.

Keys hash exactly what an artefact depends on:

* model: ``{"dataset", "model", "trainer"}`` configs (CLI) or a digest of the weights (API);
* factors: ``{"model": model key, "solver": solver.fit_config()}`` (damping excluded for damping-free fits);
* scores: ``{"what", "factors", "dampings", "train": data key, "extra": queries etc.}``, one entry per chunk.

Anything else a stage computes once and reuses (retraining's ground truth, a retrained model's weights) goes
through :meth:`Artifacts.cached`, the one get-or-compute of the package, which also runs without a cache
(``paths.cache=null``: every call computes).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .cache import Cache, Snapshots, config_hash
from .data.base import LabeledData
from .errors import NonFiniteError
from .health import check_factors, check_parameters
from .progress import progress
from .solvers.base import Damping, Solver
from .solvers.iterative import IterativeSolver
from .train import checkpoint_tensors, set_checkpoints, split_checkpoints

log = logging.getLogger("influencelab")


def digest(*tensors: torch.Tensor) -> str:
    """Content hash of tensors (for keys of things given as data rather than config)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def model_digest(model: nn.Module) -> str:
    """Key of a model given as an object: its class and the content of its state dict."""
    state = model.state_dict()
    return type(model).__qualname__ + "-" + digest(*(state[k] for k in sorted(state)))


def data_digest(data: LabeledData) -> str:
    """Key of a data set given as an object: its inputs and targets when in memory; otherwise its length, targets
    and the first eight inputs (pass an explicit key to the API for data sets that change in other ways)."""
    if data.in_memory:
        return digest(data.x, data.targets)
    return f"{len(data)}-" + digest(data.targets, data.images(range(min(8, len(data)))))


@dataclass
class FitInfo:
    key: str
    seconds: float
    cached: bool


class Artifacts:
    """The cache, seen as the run's artefacts. ``root=None``: nothing is cached (every call computes)."""

    def __init__(self, root: str | Path | None, checkpoint_s: float = 30.0):
        self.cache = Cache(root) if root is not None else None
        self.checkpoint_s = float(checkpoint_s)

    def key(self, payload: Any) -> str:
        return config_hash(payload)

    # -- anything else computed once ------------------------------------------------------------------------
    def cached(self, kind: str, config: Any, compute: Callable[[], dict[str, torch.Tensor]],
               meta: dict[str, Any] | None = None, info: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The tensors cached under ``kind`` for ``config`` (JSON-able: exactly what they depend on; hashed into
        the key), or ``compute()``'s, written to the cache atomically (a reader sees the whole entry or none)
        together with ``config``, ``meta`` and the compute time. Without a cache (``root=None``) it computes every
        time. ``info``, when given, receives ``seconds`` (the compute time, that of the run that computed it for a
        cached entry) and ``cached``."""
        key = self.key(config)
        hit = self.cache.get(kind, key) if self.cache is not None else None
        if hit is not None:
            if info is not None:
                stored = hit[1]
                info.update(seconds=float(stored.get("seconds", stored.get("train_s", float("nan")))), cached=True)
            return hit[0]
        t0 = time.perf_counter()
        tensors = compute()
        seconds = time.perf_counter() - t0
        if self.cache is not None:
            self.cache.put(kind, key, tensors, config, {"seconds": seconds, **({"meta": meta} if meta else {})})
        if info is not None:
            info.update(seconds=seconds, cached=False)
        return tensors

    # -- trained models ------------------------------------------------------------------------------------
    def model(self, model: nn.Module, key: str, config: Any, train: Callable[[nn.Module], dict]
              ) -> dict[str, Any]:
        """Load ``model``'s trained weights under ``key`` or train it (``train(model) -> history``) and cache it;
        returns ``{"train_s", "history", "cached"}``. Under torchrun rank 0 trains first, the others then load."""
        if not distributed.is_main():
            distributed.barrier()
        hit = self.cache.get("models", key) if self.cache is not None else None
        if hit is not None:
            state, checkpoints = split_checkpoints(hit[0])  # (trainer.checkpoints: kept in the model's entry)
            model.load_state_dict(state)
            set_checkpoints(model, checkpoints)
            log.info("reusing cached model %s (trained in %.1fs)", key, hit[1]["train_s"])
            info = {**hit[1], "cached": True}
        else:
            t0 = time.perf_counter()
            history = train(model)
            info = {"train_s": time.perf_counter() - t0, "history": history, "cached": False}
            if self.cache is not None:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()} | checkpoint_tensors(model)
                self.cache.put("models", key, state, config, {"train_s": info["train_s"], "history": history})
        if distributed.is_main():
            distributed.barrier()
        return info

    # -- solver factors --------------------------------------------------------------------------------------
    def fit_key(self, solver: Solver, model_key: str) -> str:
        return self.key({"model": model_key, "solver": solver.fit_config()})

    def fit(self, solver: Solver, model: nn.Module, data: LabeledData, model_key: str) -> FitInfo:
        """Fit ``solver`` (set up on ``model``) or load its cached state; a long fit snapshots its running sums
        and resumes from them when killed (so do an iterative solver's long solves later: ``set_resume``). Its
        :meth:`~Solver.components` (a preconditioner) are fitted or loaded first, each under its own key (a
        preconditioning EK-FAC reuses a ``solver=ekfac`` run's fit); the returned seconds include theirs."""
        check_parameters(model)
        parts = 0.0
        for sub in solver.components():
            if sub.layout is None:
                sub.setup(model)
            parts += self.fit(sub, model, data, model_key).seconds
        info = self._fit(solver, model, data, model_key)
        if isinstance(solver, IterativeSolver):  # (its long solves snapshot and resume under the fit's key)
            solver.set_resume(self.cache, info.key, self.checkpoint_s)
        return FitInfo(info.key, info.seconds + parts, info.cached)

    def _fit(self, solver: Solver, model: nn.Module, data: LabeledData, model_key: str) -> FitInfo:
        key = self.fit_key(solver, model_key)
        fit_cfg = {"model": model_key, "solver": solver.fit_config()}
        hit = self.cache.get("factors", key) if self.cache is not None else None
        if hit is not None:
            check_factors(solver.label, hit[0], f"the cached entry {self.cache.paths('factors', key)[0]}")
            solver.load_state_dict({k: v.to(solver.device) for k, v in hit[0].items()})
            solver.bind(model, data)
            seconds = float(hit[1].get("fit_s", 0.0))
            log.info("reusing cached %s %s %s (fitted in %.1fs)", solver.label, fitted_what(solver, hit[0]), key,
                     seconds)
            return FitInfo(key, seconds, True)
        snapshots = None
        if self.cache is not None:
            name = f"{key}-r{distributed.rank()}of{distributed.world_size()}"
            snapshots = Snapshots(self.cache, name, self.checkpoint_s)
        t0 = time.perf_counter()
        with distributed.collective():
            try:
                solver.fit(model, data, snapshots=snapshots)
            except RuntimeError as e:
                if "inf" not in str(e) or "nan" not in str(e):
                    raise
                raise NonFiniteError(f"fitting {solver.label} failed on non-finite numbers ({str(e).splitlines()[0]})"
                                     f": the model's outputs overflow on the training data; check the model "
                                     f"(its training loss, its weights) or use solver.dtype=float64") from None
        seconds = time.perf_counter() - t0
        check_factors(solver.label, solver.state_dict(), "the fit")
        if self.cache is not None and distributed.is_main():
            self.cache.put("factors", key, solver.state_dict(), fit_cfg, {"fit_s": seconds})
        distributed.barrier()
        if snapshots is not None:
            snapshots.clear()
        return FitInfo(key, seconds, False)

    # -- scores -------------------------------------------------------------------------------------------------
    def score_key(self, what: str, fit_key: str, dampings: list[Damping], data_key: Any, extra: Any = None) -> str:
        return self.key({"what": what, "factors": fit_key, "dampings": list(dampings), "train": data_key,
                         "extra": extra})

    def chunked(self, kind: str, key: str, n: int, chunk_size: int, compute: Callable[[int, int], torch.Tensor],
                partition: tuple[int, int] = (0, 1), meta: Callable[[], dict[str, Any]] | None = None,
                metas: list[dict[str, Any]] | None = None) -> torch.Tensor | None:
        """Scores over ``n`` training points in chunks of ``chunk_size``: compute the missing chunks this worker
        owns (chunk ``c`` belongs to worker ``c % n_workers``, workers being partitions x ranks), write each to
        the cache atomically as soon as it is done (resume = skip finished chunks), then assemble all chunks
        along the last dim. Returns ``None`` when chunks owned by other partitions are still missing.
        ``meta()``, called after each chunk is computed, is stored with it (e.g. the solver's convergence);
        ``metas`` receives every chunk's, computed now or read from the cache (``{}`` where none was stored)."""
        part, n_parts = partition
        workers, me = n_parts * distributed.world_size(), part * distributed.world_size() + distributed.rank()
        computed = 0
        chunks = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
        ckeys = [f"{key}/chunk{i:05d}_{s}_{e}" for i, (s, e) in enumerate(chunks)]
        done: dict[int, torch.Tensor] = {}
        info: dict[int, dict[str, Any]] = {}
        for i in progress([i for i in range(len(chunks)) if i % workers == me], desc=kind):
            hit = self.cache.get(kind, ckeys[i]) if self.cache is not None else None
            if hit is not None:
                done[i], info[i] = hit[0]["scores"], hit[1].get("meta", {})
                continue
            computed += 1
            s, e = chunks[i]
            done[i] = compute(s, e)
            info[i] = meta() if meta is not None else {}
            if self.cache is not None:
                self.cache.put(kind, ckeys[i], {"scores": done[i]}, config={"parent": key, "start": s, "end": e},
                               info={"meta": info[i]} if meta is not None else None)
        distributed.barrier()
        parts = []
        for i in range(len(chunks)):
            if i not in done:
                hit = self.cache.get(kind, ckeys[i]) if self.cache is not None else None
                if hit is None:
                    return None
                done[i], info[i] = hit[0]["scores"], hit[1].get("meta", {})
            parts.append(done[i])
        if computed < len(chunks):  # (a damping sweep's other jobs read the pass its first job scored)
            log.info("reusing cached %s scores %s (%d of %d chunks computed earlier)", kind, key,
                     len(chunks) - computed, len(chunks))
        if metas is not None:
            metas.extend(info[i] for i in range(len(chunks)))
        return torch.cat(parts, dim=-1)


def fitted_what(solver: Solver, state: dict[str, torch.Tensor]) -> str:
    """What a solver's cached fit holds, for the log: ``factors`` (EK-FAC, K-FAC, ...), or for an iterative solver
    (no factors) its fitted tensors (LiSSA's ``scale``), or ``setup (nothing fitted)`` (CG)."""
    if solver.iteration_key is None:
        return "factors"
    return f"fit ({', '.join(state)})" if state else "setup (nothing fitted)"

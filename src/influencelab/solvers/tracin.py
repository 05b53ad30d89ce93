"""TracIn (Pruthi et al. 2020, TracInCP): the influence of training point z on query q is the sum over saved training
checkpoints ``θ_t`` of ``lr_t g_q(θ_t)^T g_z(θ_t)``, with ``g`` the loss gradient on the tracked parameters and
``lr_t`` the learning rate of the step that produced the checkpoint. Self-influence: ``sum_t lr_t |g_z(θ_t)|^2``.

The checkpoints are the trained model's own: ``trainer.checkpoints=N`` saves N evenly spaced ones (the last one is
the trained model; :func:`influencelab.train.checkpoint_steps`) and keeps them in the cached model entry, under the
model's key, so a cached model still has them. API users attach their own with
:func:`influencelab.train.set_checkpoints` (or train with :class:`influencelab.train.Trainer` ``(checkpoints=N)``).
With one checkpoint at the trained weights this is the ``identity`` solver times that checkpoint's lr.

Behind the :class:`~.base.Solver` interface a "gradient" is the concatenation ``[g(θ_1), ..., g(θ_N)]`` (``N x P``
wide) and "preconditioning" multiplies block ``t`` by ``lr_t``: the engine's ``pairwise`` (preconditioned queries
against training gradients), ``self`` and caching then work unchanged. Every gradient comes from the identity
solver's hooks (:mod:`.blocks`) with the model's weights set to the checkpoint's for the call (and put back after).
``damping`` is accepted and ignored, as for ``identity``; the learning rate is the optimizer's ``lr`` (also for Adam,
as TracIn implementations take it). Queries of ``N x P`` numbers each are held in memory by the pairwise stage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..data.base import LabeledData
from ..errors import ConfigError
from ..train import Checkpoint, get_checkpoints
from .base import Damping, Solver
from .blocks import BlockGradSolver
from .identity import Identity
from .layout import ParamLayout


def _needs_checkpoints(where: str) -> ConfigError:
    return ConfigError(f"solver=tracin needs the training checkpoints of the model ({where}): set "
                       f"trainer.checkpoints=N (N >= 1, e.g. 5; the model is then trained again, once, and cached with "
                       f"them); API: train with influencelab.train.Trainer(checkpoints=N) or attach them with "
                       f"influencelab.train.set_checkpoints")


class TracIn(Identity):
    """Sum over checkpoints of lr-weighted gradient dot products (see the module docstring). ``checkpoints``: how
    many the trainer saved (the CLI passes ``trainer.checkpoints``, so a run without them stops before training);
    ``None`` (the API): whatever the model carries."""

    name = "tracin"
    vectors = "one loss gradient per training checkpoint, side by side"

    def __init__(self, damping: Any = 0.0, curvature: str = "fisher", modules: Any = "all", dtype: str = "float32",
                 batch_size: int = 256, device: str = "cpu", seed: int = 0, autocast: str | None = None,
                 task: Any = None, checkpoints: int | None = None):
        super().__init__(damping, curvature, modules, dtype, batch_size, device, seed, autocast, task)
        if checkpoints is not None and not (isinstance(checkpoints, int) and checkpoints >= 1):
            raise _needs_checkpoints(f"trainer.checkpoints={checkpoints!r}")
        self.checkpoints = checkpoints
        self._checkpoints: list[Checkpoint] = []
        self._lrs: torch.Tensor | None = None
        self._digest = ""

    # -- the checkpoints -------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module) -> ParamLayout:
        """As :meth:`Identity.setup`, and take the model's checkpoints (none yet on an untrained model: :meth:`fit`
        says so)."""
        layout = super().setup(model)
        cps = get_checkpoints(model)
        if cps:
            self._checkpoints = cps
            self._lrs = torch.tensor([c.lr for c in cps], dtype=torch.float64)
            h = hashlib.sha256()
            for c in cps:
                h.update(f"{c.step}:{c.lr!r}".encode())
                for k in sorted(c.state):
                    h.update(k.encode() + c.state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                             .tobytes())
            self._digest = h.hexdigest()[:16]
        return layout

    def fit(self, model: nn.Module, data: LabeledData, snapshots=None) -> None:
        """Nothing to fit: check the model carries its checkpoints."""
        if self.layout is None or not self._checkpoints:
            self.setup(model)
        if not self._checkpoints:
            raise _needs_checkpoints("the model carries none")
        if self.checkpoints is not None and len(self._checkpoints) != self.checkpoints:
            raise ConfigError(f"solver.checkpoints={self.checkpoints} is invalid: the model carries "
                              f"{len(self._checkpoints)} checkpoints (trainer.checkpoints must match)")

    def fit_config(self) -> dict[str, Any]:
        """As every solver's, plus a digest of the checkpoints (two models with the same final weights but other
        checkpoints, given to the API, do not share cached scores)."""
        return {**super().fit_config(), "checkpoints_digest": self._digest}

    @property
    def lrs(self) -> torch.Tensor:
        """The checkpoints' learning rates ``[N]`` (float64)."""
        if self._lrs is None:
            raise _needs_checkpoints("the model carries none")
        return self._lrs

    @contextmanager
    def _at(self, model: nn.Module) -> Iterator[Iterator[int]]:
        """Yields an iterator over the checkpoints' indices; while at ``t`` the model holds checkpoint ``t``'s
        weights (and buffers). The model's own are put back on exit."""
        if not self._checkpoints:
            raise _needs_checkpoints("the model carries none")
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def steps() -> Iterator[int]:
            for t, c in enumerate(self._checkpoints):
                model.load_state_dict(c.state)
                yield t

        try:
            yield steps()
        finally:
            model.load_state_dict(own)

    # -- the Solver interface over N x P wide vectors ---------------------------------------------------------------
    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        """Block ``t`` of ``[k, N x P]`` times ``lr_t``."""
        n = len(self.lrs)
        w = self.lrs.to(device=v.device, dtype=v.dtype)
        return (v.reshape(len(v), n, -1) * w[None, :, None]).reshape(v.shape)

    def train_grads(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[b, N x P]``: each checkpoint's per-example loss gradients, side by side."""
        with self._at(model) as steps:
            return torch.cat([Identity.train_grads(self, model, x, y) for _ in steps], dim=1)

    def query_grads(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[b, N x P]``: each checkpoint's gradients of the task's query measurement, side by side."""
        if self.task.measures_loss:
            return self.train_grads(model, x, y)
        with self._at(model) as steps:
            return torch.cat([Solver._grads(self, model, x, y, self.task.measurement) for _ in steps], dim=1)

    def prepare_queries(self, preconditioned: torch.Tensor) -> list[Any]:
        """One :meth:`Identity.prepare_queries` per checkpoint (views of its ``P`` columns)."""
        assert self.layout is not None
        size = self.layout.size
        return [Identity.prepare_queries(self, preconditioned[:, t * size:(t + 1) * size])
                for t in range(len(self.lrs))]

    def pairwise(self, model: nn.Module, preconditioned: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[k, b]``: the sum over checkpoints of the preconditioned queries' block against the batch's gradients."""
        prepared = preconditioned if isinstance(preconditioned, list) else self.prepare_queries(preconditioned)
        out = None
        with self._at(model) as steps:
            for t in steps:
                s = (BlockGradSolver.pairwise(self, model, prepared[t], x, y) if self._hooks
                     else prepared[t].to(self.dtype) @ Identity.train_grads(self, model, x, y).T)
                out = s if out is None else out + s
        return out

    def self_influence(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       dampings: Sequence[Damping]) -> torch.Tensor:
        """``sum_t lr_t |g_z(θ_t)|^2`` (the same for every damping): ``[len(dampings), b]``."""
        total = torch.zeros(len(y), dtype=torch.float64, device=self.device)
        with self._at(model) as steps:
            for t in steps:
                sq = (Identity.self_influence(self, model, x, y, dampings[:1])[0] if self._hooks
                      else Identity.train_grads(self, model, x, y).square().sum(1))
                total += float(self.lrs[t]) * sq.double()
        return total.to(self.dtype).expand(len(dampings), -1).clone()

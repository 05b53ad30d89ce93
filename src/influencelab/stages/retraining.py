"""Retraining, once for every stage that compares with it: :func:`retrained` trains the run's model and trainer
config (with a given seed, on given data, from scratch or warm from the trained model, optionally with points left
out of their batches) and keeps what the caller needs of the result (its weights, or its measurements of some
queries), cached by exactly what that depends on (through :meth:`~influencelab.artifacts.Artifacts.cached`, so it
also runs without a cache). The LDS and LOO ground truth (:func:`retrained_measurements`), unlearning's gold
standard and its cross-validation fold models (:func:`retrained_model`) are all this one function."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..artifacts import digest
from ..data.base import LabeledData
from ..pipeline import Context
from ..progress import activity
from ..tasks import Task, resolve_task


@torch.no_grad()
def query_measurements(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task | None = None
                       ) -> dict[str, torch.Tensor]:
    """Per-query measurements of the task (classification: loss and margin; regression: loss), float64 on the CPU."""
    p = next(model.parameters())
    out = resolve_task(task).query_measurements(model(x.to(p)), y.to(p.device))
    return {k: v.double().cpu() for k, v in out.items()}


def retrained(ctx: Context, data: LabeledData, seed: int, key: dict[str, Any], kind: str, *,
              warm: tuple[int, float] | None = None, exclude: torch.Tensor | None = None,
              keep: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
              meta: dict[str, Any] | None = None, info: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Train a fresh model (the run's model and trainer config with trainer seed ``seed``, on the run's task) on
    ``data`` and return ``keep(model)`` (default: its state dict), cached under ``kind``.

    ``key``: what ``data`` and ``seed`` are, as the caller identifies them (e.g. the positions kept and the seed);
    the cache key adds the run's model config (dataset, model, trainer, task) and the options below.
    ``warm=(epochs, lr_scale)`` instead continues training the run's trained model for that many epochs at that
    learning-rate scale (Koh & Liang's leave-one-out protocol). ``exclude`` (positions within ``data``) leaves
    points out of training while keeping every other batch as in the full run. ``meta`` is stored with the entry;
    ``info`` receives ``seconds`` (the training time) and ``cached`` (see
    :meth:`~influencelab.artifacts.Artifacts.cached`)."""
    config = {"model": ctx.model_config(), **key,
              **({"warm": list(warm), "from": ctx.model_key} if warm else {}),
              **({"exclude": exclude.tolist()} if exclude is not None else {})}

    def train() -> dict[str, torch.Tensor]:
        trainer = dataclasses.replace(ctx.trainer, seed=seed)
        if warm:
            torch.manual_seed(seed)
            model = copy.deepcopy(ctx.model).train()
            trainer = dataclasses.replace(trainer, epochs=int(warm[0]), lr=trainer.lr * float(warm[1]))
        else:
            model = ctx.build_model(seed)
        with activity(f"retraining ({kind}, {len(data)} points, trainer.seed={seed})"):  # named in heartbeat lines
            trainer.fit(model, data, exclude=exclude, task=ctx.task)
        model.eval()
        if keep is not None:
            return keep(model)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    return ctx.artifacts.cached(kind, config, train, meta, info)


def retrained_model(ctx: Context, data: LabeledData, seed: int, key: dict[str, Any], kind: str,
                    **options: Any) -> nn.Module:
    """:func:`retrained`'s model itself (its weights cached), on the run's device, in eval mode."""
    state = retrained(ctx, data, seed, key, kind, **options)
    model = ctx.build_model(seed)
    model.load_state_dict(state)
    return model.to(ctx.device).eval()


def retrained_measurements(ctx: Context, positions: torch.Tensor, seed: int, x: torch.Tensor, y: torch.Tensor,
                           tag: str, warm: tuple[int, float] | None = None,
                           exclude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The task's measurements (:func:`query_measurements`) of the queries ``(x, y)`` by a model retrained (see
    :func:`retrained`) on the training points at ``positions`` with trainer seed ``seed``; cached per (model
    config, positions, seed, queries, ``tag``, ``warm``, ``exclude``)."""
    key = {"positions": digest(positions), "seed": seed, "queries": digest(y) + digest(x), "tag": tag}
    return retrained(ctx, ctx.train_data.subset(positions), seed, key, "retrain", warm=warm, exclude=exclude,
                     keep=lambda m: query_measurements(m, x, y, ctx.task),
                     meta={"n": len(positions), "seed": seed, "tag": tag})

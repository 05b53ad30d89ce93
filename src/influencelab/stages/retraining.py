"""Retraining ground truth shared by the LDS and LOO stages: the run's model and trainer config trained on a
subset (or with points left out of their batches), its query loss and margin measured, cached per what it
depends on."""

from __future__ import annotations

import copy
import dataclasses

import torch

from ..artifacts import digest
from ..pipeline import Context


@torch.no_grad()
def query_measurements(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query loss and margin (correct logit minus the best other logit)."""
    out = model(x.to(next(model.parameters())))
    loss = torch.nn.functional.cross_entropy(out, y, reduction="none")
    correct = out.gather(1, y[:, None]).squeeze(1)
    other = out.scatter(1, y[:, None], float("-inf")).amax(1)
    return {"loss": loss.double().cpu(), "margin": (correct - other).double().cpu()}


def retrained_measurements(ctx: Context, positions: torch.Tensor, seed: int, x: torch.Tensor, y: torch.Tensor,
                           tag: str, warm: tuple[int, float] | None = None,
                           exclude: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Train a fresh model (the run's model and trainer config, trainer seed ``seed``) on the training points
    at ``positions``, and measure the queries; cached per (model config, positions, seed, queries).
    ``warm=(epochs, lr_scale)`` instead continues training the run's trained model for that many epochs at
    that learning-rate scale (Koh & Liang's leave-one-out protocol). ``exclude`` (positions within
    ``positions``) leaves points out of training while keeping every other batch as in the full run."""
    key = ctx.artifacts.key({"model": ctx.model_config(), "positions": digest(positions), "seed": seed,
                             "queries": digest(y) + digest(x), "tag": tag,
                             **({"warm": list(warm), "from": ctx.model_key} if warm else {}),
                             **({"exclude": exclude.tolist()} if exclude is not None else {})})
    hit = ctx.artifacts.cache.get("retrain", key)
    if hit is not None:
        return hit[0]
    trainer = dataclasses.replace(ctx.trainer, seed=seed)
    if warm:
        torch.manual_seed(seed)
        model = copy.deepcopy(ctx.model).train()
        trainer = dataclasses.replace(trainer, epochs=int(warm[0]), lr=trainer.lr * float(warm[1]))
    else:
        model = ctx.build_model(seed)
    trainer.fit(model, ctx.train_data.subset(positions), exclude=exclude)
    out = query_measurements(model.eval(), x, y.to(next(model.parameters()).device))
    ctx.artifacts.cache.put("retrain", key, out, {"n": len(positions), "seed": seed, "tag": tag})
    return out

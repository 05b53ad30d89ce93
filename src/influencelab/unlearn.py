"""The paper's two open questions (its Sec. 8), measured: one influence (Newton) step for

* sample removal: ``θ_new = θ + (1/n) H^-1 Σ_{z in R} ∇L(z, θ)``;
* label repair:   ``θ_new = θ + (1/n) H^-1 Σ_{z in R} (∇L((x, y_wrong), θ) - ∇L((x, y_fixed), θ))``;

with ``H^-1`` from any solver (``(G + λI)^-1``; the damping plays the role of the L2 term), against the gold
standard (retraining without R / with corrected labels, same seed and schedule) and a fine-tuning baseline.
Only the solver's tracked parameters are edited (BatchNorm/LayerNorm/embeddings stay as trained).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import plots
from .data.base import LabeledData
from .errors import ConfigError, check
from .pipeline import Context, build, stage
from .solvers.base import Damping, Solver


def grad_sum(solver: Solver, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Sum of per-example loss gradients (flat, tracked parameters) over ``(x, y)``: ``[1, P]``."""
    parts = [solver.train_grads(model, x[i:i + batch], y[i:i + batch]).sum(0, keepdim=True)
             for i in range(0, len(x), batch)]
    return torch.cat(parts).sum(0, keepdim=True)


def newton_edit(solver: Solver, model: nn.Module, direction: torch.Tensor, n: int, damping: Damping) -> nn.Module:
    """A copy of ``model`` with ``θ + (1/n) (G + λI)^-1 direction`` on the tracked parameters."""
    assert solver.layout is not None
    step = solver.precondition(direction, damping) / n
    if not torch.isfinite(step).all():
        raise ConfigError(f"solver.damping={damping} is invalid for stage unlearn: the Newton step is not finite; "
                          f"increase it")
    edited = copy.deepcopy(model)
    params = dict(edited.named_parameters())
    with torch.no_grad():
        for name, delta in solver.layout.unflatten(step, model).items():
            params[name].add_(delta[0].to(params[name].dtype))
    return edited


def removal_step(solver: Solver, model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int,
                 damping: Damping) -> nn.Module:
    """Sample removal by one Newton step."""
    return newton_edit(solver, model, grad_sum(solver, model, x, y), n, damping)


def repair_step(solver: Solver, model: nn.Module, x: torch.Tensor, y_wrong: torch.Tensor, y_fixed: torch.Tensor,
                n: int, damping: Damping) -> nn.Module:
    """Label repair by one Newton step."""
    d = grad_sum(solver, model, x, y_wrong) - grad_sum(solver, model, x, y_fixed)
    return newton_edit(solver, model, d, n, damping)


@torch.no_grad()
def _probs(model: nn.Module, data: LabeledData, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    dev = next(model.parameters())
    outs, ys = [], []
    for x, y, pos in data.batches(512):
        outs.append(torch.log_softmax(model(x.to(dev)).double(), -1).cpu())
        ys.append(y if labels is None else labels[pos])
    logp, y = torch.cat(outs), torch.cat(ys)
    return logp, {"accuracy": float((logp.argmax(1) == y).double().mean()), "loss": float(F.nll_loss(logp, y))}


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


@stage("unlearn")
def unlearn_stage(ctx: Context) -> None:
    """Remove or repair a set R of training points by one Newton step; compare with retraining and fine-tuning."""
    c = ctx.cfg.unlearn
    check(c.mode in ("remove", "repair"), "unlearn.mode", c.mode, "use remove or repair")
    check(c.selection in ("random", "self_influence", "flipped"), "unlearn.selection", c.selection,
          "use random, self_influence or flipped")
    train, test = ctx.train_data, ctx.test_data
    n = len(train)
    check(1 <= c.size < n, "unlearn.size", c.size, f"must be in [1, {n})")
    if c.mode == "repair" and not train.flipped.any():
        raise ConfigError("unlearn.mode=repair is invalid without flipped labels: set dataset.label_noise > 0")
    model, solver = ctx.model, ctx.solver
    R = select(ctx, c.selection, int(c.size))
    if c.mode == "repair":
        R = R[train.flipped[R]]  # only mislabeled points can be repaired
        if len(R) == 0:
            raise ConfigError(f"unlearn.selection={c.selection} found no flipped label among {c.size} points to "
                              f"repair; use unlearn.selection=flipped or a larger unlearn.size")
    keep = torch.ones(n, dtype=torch.bool)
    keep[R] = False
    fixed = train.targets.clone()
    fixed[R] = train.clean_targets[R]
    imodel = ctx.influence_model(solver)
    x_r, y_r = train.images(R), train.targets[R]
    damping = solver.dampings[0]

    t0 = time.perf_counter()
    if c.mode == "remove":
        edited = removal_step(solver, imodel, x_r, y_r, n, damping)
    else:
        edited = repair_step(solver, imodel, x_r, y_r, fixed[R], n, damping)
    edit_s = time.perf_counter() - t0
    edited = edited.to(next(model.parameters()).dtype)

    target_data = train.subset(keep.nonzero().squeeze(1)) if c.mode == "remove" else \
        LabeledData(train.x, fixed, train.clean_targets, train.indices, train.num_classes, train.classes)
    retrained, retrain_s = retrain(ctx, target_data, R, c.mode)
    t0 = time.perf_counter()
    finetuned = copy.deepcopy(model)
    ft = dataclasses.replace(ctx.trainer, epochs=int(c.finetune_epochs), lr=ctx.trainer.lr * float(c.finetune_lr_scale))
    ft.fit(finetuned, target_data)
    finetune_s = time.perf_counter() - t0

    models = {"original": model, "edited": edited, "finetuned": finetuned, "retrained": retrained}
    ref_logp, _ = _probs(retrained, test)
    theta_ref, theta_0 = _flat(retrained), _flat(model)
    r_data = train.subset(R)
    r_labels = y_r if c.mode == "remove" else fixed[R]
    classes = torch.unique(fixed[R])
    in_classes = torch.isin(test.targets, classes).nonzero().squeeze(1)
    metrics: dict = {"unlearn/n_points": len(R), "unlearn/n_flipped_in_set": int(train.flipped[R].sum()),
                     "time/unlearn_edit_s": edit_s, "time/unlearn_retrain_s": retrain_s,
                     "time/unlearn_finetune_s": finetune_s}
    for name, m in models.items():
        m.eval()
        logp, test_stats = _probs(m, test)
        _, r_stats = _probs(m, r_data, torch.as_tensor(r_labels))
        _, cls_stats = _probs(m, test.subset(in_classes))
        metrics.update({f"unlearn/{name}/test_accuracy": test_stats["accuracy"],
                        f"unlearn/{name}/test_loss": test_stats["loss"],
                        f"unlearn/{name}/set_accuracy": r_stats["accuracy"],
                        f"unlearn/{name}/set_loss": r_stats["loss"],
                        f"unlearn/{name}/class_test_accuracy": cls_stats["accuracy"]})
        if name != "retrained":
            agree = float((logp.argmax(1) == ref_logp.argmax(1)).double().mean())
            kl = float((ref_logp.exp() * (ref_logp - logp)).sum(1).mean())
            dist = float((_flat(m) - theta_ref).norm() / (theta_0 - theta_ref).norm().clamp_min(1e-30))
            metrics.update({f"unlearn/{name}/agreement": agree, f"unlearn/{name}/kl_to_retrained": kl,
                            f"unlearn/{name}/param_dist_rel": dist})
    ctx.tracker.log(metrics)
    ctx.tracker.figure("unlearn", plots.unlearn_bars(metrics, c.mode, len(R), c.selection))


def select(ctx: Context, selection: str, size: int) -> torch.Tensor:
    """Positions of the set R: ``size`` random points, the top self-influence ones, or flipped-label points."""
    train = ctx.train_data
    if selection == "random":
        g = torch.Generator().manual_seed(int(ctx.cfg.seed) + 17)
        return torch.randperm(len(train), generator=g)[:size].sort().values
    if selection == "self_influence":
        return torch.argsort(ctx.self_influence[0], descending=True)[:size].sort().values
    flipped = train.flipped.nonzero().squeeze(1)
    if len(flipped) == 0:
        raise ConfigError("unlearn.selection=flipped is invalid without flipped labels: set dataset.label_noise > 0")
    g = torch.Generator().manual_seed(int(ctx.cfg.seed) + 17)
    return flipped[torch.randperm(len(flipped), generator=g)[:size]].sort().values


def retrain(ctx: Context, data: LabeledData, R: torch.Tensor, mode: str) -> tuple[nn.Module, float]:
    """Gold standard: the run's model and trainer config, same seed, on ``data``; cached by what it depends on."""
    key = ctx.cache.key({"model": ctx.model_config, "mode": mode, "R": R.tolist()})
    torch.manual_seed(ctx.trainer.seed)
    model = build(ctx.cfg.model)
    hit = ctx.cache.get("unlearn_retrained", key)
    if hit is not None:
        model.load_state_dict(hit[0])
        return model.to(ctx.device).eval(), float(hit[1]["train_s"])
    t0 = time.perf_counter()
    ctx.trainer.fit(model, data)
    train_s = time.perf_counter() - t0
    ctx.cache.put("unlearn_retrained", key, {k: v.detach().clone() for k, v in model.state_dict().items()},
                  {"mode": mode, "n_removed": len(R)}, {"train_s": train_s})
    return model.eval(), train_s


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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import plots
from ..data.base import LabeledData
from ..errors import ConfigError, check
from ..pipeline import Context
from ..registry import report_plot, stage
from ..solvers.base import Damping, Solver, needs_parameter_space
from ..tasks import Task, resolve_task
from ..train import outputs
from .retraining import retrained_model
from .select import estimated_flip_count


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


def _evaluated(model: nn.Module, data: LabeledData, task: Task, targets: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict]:
    """The model's outputs on ``data`` (float64) and its task metric and mean loss there, under ``targets``
    (default: the stored ones)."""
    out = outputs(model, data)
    y = data.targets if targets is None else targets
    return out, {task.metric_name: task.metric_value(task.metric_terms(out, y)), "loss": float(task.loss(out, y).mean())}


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


REPAIR_TO = ("prediction", "crossval", "oracle")


@dataclass
class UnlearnConfig:
    """A set R of ``size`` points chosen by ``selection`` (``random`` | ``self_influence`` top | ``flipped``),
    removed or repaired (``mode``) by one Newton step; repair relabels to ``repair_to`` (``prediction`` |
    ``crossval`` with ``folds`` held-out models | ``oracle``, the true labels: an upper bound); the fine-tuning
    baseline runs ``finetune_epochs`` at ``finetune_lr_scale`` x the learning rate."""

    mode: str = "remove"
    selection: str = "flipped"
    size: Any = 10  # an integer, or auto: the estimated number of flipped labels (stages/select.py)
    repair_to: str = "prediction"
    folds: int = 2
    finetune_epochs: int = 1
    finetune_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        check(self.mode in ("remove", "repair"), "unlearn.mode", self.mode, "use remove or repair")
        check(self.selection in ("random", "self_influence", "flipped"), "unlearn.selection", self.selection,
              "use random, self_influence or flipped")
        check(self.repair_to in REPAIR_TO, "unlearn.repair_to", self.repair_to, f"use one of {', '.join(REPAIR_TO)}")
        check(self.folds >= 2, "unlearn.folds", self.folds, "must be an integer >= 2 (models trained without each fold)")
        check(self.size == "auto" or (isinstance(self.size, int) and not isinstance(self.size, bool)
                                      and self.size >= 1), "unlearn.size", self.size,
              "must be an integer >= 1, or auto (the number of flipped labels estimated by injected flips)")
        check(self.finetune_epochs >= 1, "unlearn.finetune_epochs", self.finetune_epochs, "must be >= 1")
        check(self.finetune_lr_scale > 0, "unlearn.finetune_lr_scale", self.finetune_lr_scale, "must be > 0")


def needs_flips_for_oracle(ctx: Context) -> None:
    """Selecting flipped points, or repairing labels, needs class labels; selecting flipped points, or repairing to
    the true labels, needs flipped labels; the Newton step needs a solver of the parameters' gradients."""
    needs_parameter_space(ctx.new_solver(), "unlearn", "Newton step on the parameters")
    c = ctx.section("unlearn")
    if not ctx.task.has_classes:
        if c.mode == "repair":
            raise ConfigError(f"stage unlearn with unlearn.mode=repair needs class labels: task={ctx.task.name} has "
                              f"none; use unlearn.mode=remove")
        if c.selection == "flipped":
            raise ConfigError(f"unlearn.selection=flipped needs flipped class labels: task={ctx.task.name} has none; "
                              f"use unlearn.selection=random or self_influence")
        return
    if ctx.dataset_spec.label_noise > 0:
        return
    if c.selection == "flipped":
        raise ConfigError("unlearn.selection=flipped is invalid without flipped labels: set dataset.label_noise > 0")
    if c.mode == "repair" and c.repair_to == "oracle":
        raise ConfigError("unlearn.repair_to=oracle is invalid without flipped labels: set dataset.label_noise > 0")


@stage("unlearn", section="unlearn", schema=UnlearnConfig, precheck=needs_flips_for_oracle)
def unlearn_stage(ctx: Context) -> None:
    """Remove or repair a set R of training points by one Newton step; compare with retraining and fine-tuning.

    Repair uses only what a user has (``unlearn.repair_to``): ``prediction`` relabels each point of R to the
    trained model's prediction, ``crossval`` to the prediction of a model trained without it (``unlearn.folds``
    models, each on the other folds), and R keeps the points whose new label differs from their given one. Only
    ``oracle`` (an upper bound, named as such) reads the ground truth: it keeps the flipped points of R and
    writes their true labels. The flip mask is otherwise used only to report how many were right."""
    c = ctx.section("unlearn")
    repair_to, folds = c.repair_to, c.folds
    train, test = ctx.train_data, ctx.test_data
    n = len(train)
    size = estimated_flip_count(ctx) if c.size == "auto" else int(c.size)
    check(1 <= size < n, "unlearn.size", size, f"must be in [1, {n})")
    model, solver = ctx.model, ctx.solver
    R = select(ctx, c.selection, size)
    if R is None:  # a partition job (selection by self-influence)
        return
    fixed = train.targets.clone()
    if c.mode == "repair":
        if repair_to == "oracle":  # upper bound: the ground truth decides which labels change and to what
            R = R[train.flipped[R]]
            fixed[R] = train.clean_targets[R]
        else:
            fixed[R] = predicted_labels(ctx, R, repair_to, folds)
            R = R[fixed[R] != train.targets[R]]  # only points whose label actually changes are repaired
        if len(R) == 0:
            raise ConfigError(f"unlearn.selection={c.selection} with unlearn.repair_to={repair_to} leaves no "
                              f"label to change among {size} points; use a larger unlearn.size")
    keep = torch.ones(n, dtype=torch.bool)
    keep[R] = False
    imodel = ctx.influence_model()
    x_r, y_r = train.images(R), train.targets[R]
    damping = solver.dampings[0]

    t0 = time.perf_counter()
    solver.reset_diagnostics()
    if c.mode == "remove":
        edited = removal_step(solver, imodel, x_r, y_r, n, damping)
    else:
        edited = repair_step(solver, imodel, x_r, y_r, fixed[R], n, damping)
    edit_s = time.perf_counter() - t0
    # an iterative solver's step says how converged it is (solver/iterations@, rel_residual_max@, converged@, ...)
    ctx.report_convergence("unlearn", solver.diagnostics())
    edited = edited.to(next(model.parameters()).dtype)

    target_data = train.subset(keep.nonzero().squeeze(1)) if c.mode == "remove" else \
        LabeledData(train.x, fixed, train.clean_targets, train.indices, train.num_classes, train.classes)
    retrained, retrain_s = retrain(ctx, target_data, R, c.mode, fixed[R] if c.mode == "repair" else None)
    t0 = time.perf_counter()
    finetuned = copy.deepcopy(model)
    ft = dataclasses.replace(ctx.trainer, epochs=int(c.finetune_epochs), lr=ctx.trainer.lr * float(c.finetune_lr_scale))
    ft.fit(finetuned, target_data, task=ctx.task)
    finetune_s = time.perf_counter() - t0

    models = {"original": model, "edited": edited, "finetuned": finetuned, "retrained": retrained}
    task = ctx.task
    ref_out = outputs(retrained, test)
    theta_ref, theta_0 = _flat(retrained), _flat(model)
    r_data = train.subset(R)
    r_labels = y_r if c.mode == "remove" else fixed[R]
    metric = task.metric_name
    metrics: dict = {"unlearn/n_points": len(R), "unlearn/n_flipped_in_set": int(train.flipped[R].sum()),
                     # evaluation only (the flip mask never decides anything outside repair_to=oracle):
                     "unlearn/n_repaired_to_true_label": int((fixed[R] == train.clean_targets[R]).sum())
                     if c.mode == "repair" else 0,
                     "unlearn/repair_to": repair_to if c.mode == "repair" else "none",
                     "time/unlearn_edit_s": edit_s, "time/unlearn_retrain_s": retrain_s,
                     "time/unlearn_finetune_s": finetune_s}
    for name, m in models.items():
        m.eval()
        out, test_stats = _evaluated(m, test, task)
        _, r_stats = _evaluated(m, r_data, task, torch.as_tensor(r_labels))
        metrics.update({f"unlearn/{name}/test_{metric}": test_stats[metric],
                        f"unlearn/{name}/test_loss": test_stats["loss"],
                        f"unlearn/{name}/set_{metric}": r_stats[metric],
                        f"unlearn/{name}/set_loss": r_stats["loss"]})
        if task.has_classes:  # the test points of the classes R's (new) labels belong to
            in_classes = torch.isin(test.targets, torch.unique(fixed[R])).nonzero().squeeze(1)
            metrics[f"unlearn/{name}/class_test_{metric}"] = _evaluated(m, test.subset(in_classes), task)[1][metric]
        if name != "retrained":
            # the divergence of the predictive distributions: KL(retrained || model) on the test set
            kl = float(task.divergence(out, ref_out).mean())
            dist = float((_flat(m) - theta_ref).norm() / (theta_0 - theta_ref).norm().clamp_min(1e-30))
            metrics.update({f"unlearn/{name}/kl_to_retrained": kl, f"unlearn/{name}/param_dist_rel": dist})
            if task.has_classes:
                agree = float((task.predict(out) == task.predict(ref_out)).double().mean())
                metrics[f"unlearn/{name}/agreement"] = agree
    ctx.tracker.log(metrics)
    ctx.tracker.figure("unlearn", plots.unlearn_bars(metrics, c.mode, len(R), c.selection))


def predicted_labels(ctx: Context, R: torch.Tensor, how: str, folds: int) -> torch.Tensor:
    """Labels a user can compute for the points R: the trained model's prediction (``prediction``), or that of a
    model trained without the point (``crossval``: the training set split into ``folds`` seeded folds, one model
    per fold trained on the others with the run's config, each cached)."""
    train = ctx.train_data
    x = train.images(R)
    if how == "prediction":
        return _predict(ctx.model, x, ctx.task)
    g = torch.Generator().manual_seed(int(ctx.cfg.seed) + 29)
    fold = torch.randperm(len(train), generator=g) % folds  # fold of each training position
    out = torch.empty(len(R), dtype=torch.long)
    for f in range(folds):
        inside = fold[R] == f
        if inside.any():
            others = (fold != f).nonzero().squeeze(1)
            held_out, _ = retrain(ctx, train.subset(others), others, f"crossval{f}of{folds}")
            out[inside] = _predict(held_out, x[inside], ctx.task)
    return out


def _predict(model: nn.Module, x: torch.Tensor, task: Task | None = None) -> torch.Tensor:
    """The task's predictions (classification: the most likely class) of ``model`` for the inputs ``x``."""
    return resolve_task(task).predict(outputs(model, x))


def select(ctx: Context, selection: str, size: int) -> torch.Tensor | None:
    """Positions of the set R: ``size`` random points, the top self-influence ones, or flipped-label points."""
    train = ctx.train_data
    if selection == "random":
        g = torch.Generator().manual_seed(int(ctx.cfg.seed) + 17)
        return torch.randperm(len(train), generator=g)[:size].sort().values
    if selection == "self_influence":
        s = ctx.self_influence
        return None if s is None else torch.argsort(s[0], descending=True)[:size].sort().values
    flipped = train.flipped.nonzero().squeeze(1)
    if len(flipped) == 0:
        raise ConfigError("unlearn.selection=flipped is invalid without flipped labels: set dataset.label_noise > 0")
    g = torch.Generator().manual_seed(int(ctx.cfg.seed) + 17)
    return flipped[torch.randperm(len(flipped), generator=g)[:size]].sort().values


def retrain(ctx: Context, data: LabeledData, R: torch.Tensor, mode: str,
            labels: torch.Tensor | None = None) -> tuple[nn.Module, float]:
    """Gold standard: the run's model and trainer config, same seed, on ``data`` (R removed, or R relabelled to
    ``labels``), by :func:`~influencelab.stages.retraining.retrained_model` (cached by what it depends on); returns
    the model and how long training it took."""
    info: dict[str, Any] = {}
    key = {"mode": mode, "R": R.tolist(), **({"labels": labels.tolist()} if labels is not None else {})}
    model = retrained_model(ctx, data, int(ctx.trainer.seed), key, "unlearn_retrained",
                            meta={"mode": mode, "n_removed": len(R)}, info=info)
    return model, info["seconds"]


@report_plot("unlearn")
def report_figure(root: Path, rows: list[dict[str, Any]], fig_dir: Path) -> list[Path]:
    """Test accuracy and KL to the retrained model against the size of the edited set (``influencelab-report``)."""
    from ..plots import labels, pyplot

    plt = pyplot()
    out: list[Path] = []
    # unlearning: test accuracy and KL to the retrained model against the size of the edited set
    unl = [r for r in rows if "unlearn/n_points" in r and "unlearn/edited/test_accuracy" in r]
    if one_set_size(unl):  # nothing to draw a line along
        return [_bars(plt, unl, labels(unl, same="all"), fig_dir)]
    if unl:
        fig_dir.mkdir(exist_ok=True)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"wspace": 0.3})
        groups: dict[str, list[dict[str, Any]]] = {}
        for r, name in zip(unl, labels(unl, exclude=("unlearn.size",), same="all")):
            groups.setdefault(name, []).append(r)
        # references that do not depend on the solver (retraining, fine-tuning, the original model) are drawn
        # once when every group shares them, in the group's colour otherwise
        refs: dict[tuple, list[tuple[str, int]]] = {}
        colors = (lambda i: f"C{i}") if len(groups) <= 10 else (lambda i: plt.cm.tab20(i % 20))
        for i, (name, rs) in enumerate(sorted(groups.items())):
            rs = sorted(rs, key=lambda r: r["unlearn/n_points"])
            n = [r["unlearn/n_points"] for r in rs]
            color = colors(i)
            a1.plot(n, [r["unlearn/edited/test_accuracy"] for r in rs], "-o", color=color,
                    label=f"edited [{name}]", markersize=4)
            a2.plot(n, [r["unlearn/edited/kl_to_retrained"] for r in rs], "-o", color=color,
                    label=f"edited [{name}]", markersize=4)
            for ax, key in ((a1, "finetuned/test_accuracy"), (a1, "retrained/test_accuracy"),
                            (a2, "original/kl_to_retrained")):
                series = (ax, key, tuple(n), tuple(r.get(f"unlearn/{key}", float("nan")) for r in rs))
                refs.setdefault(series, []).append((name, i))
        styles = {"finetuned": ":s", "retrained": "--^", "original": ":"}
        for (ax, key, n, vals), users in refs.items():
            method = key.split("/")[0]
            shared = len(users) == len(groups) and len(groups) > 1
            name, i = users[0]
            ax.plot(n, vals, styles[method], color="black" if shared else colors(i), markersize=4,
                    label=method if shared or len(groups) == 1 else f"{method} [{name}]")
        a1.set(xscale="log", xlabel="points edited |R|", ylabel="test accuracy", title="one Newton step vs retraining")
        a2.set(xscale="log", yscale="log", xlabel="points edited |R|", ylabel="KL(retrained || model), test",
               title="distance to the retrained model")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, -0.2), ncol=2 if len(groups) > 4 else 1)
        fig.savefig(fig_dir / "unlearn.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        out.append(fig_dir / "unlearn.png")
    return out


def one_set_size(rows: list[dict[str, Any]]) -> bool:
    """Several jobs of one configured set size (``unlearn.size`` not swept), e.g. detect-then-fix over repair
    modes, where the number of points edited is what each mode changed: drawn as bars, not along |R|."""
    return len(rows) > 1 and len({str(r.get("unlearn.size")) for r in rows}) == 1


def _bars(plt, rows: list[dict[str, Any]], names: list[str], fig_dir: Path) -> Path:
    """Jobs that edited sets of one size (e.g. a detect-then-fix sweep over repair modes): test accuracy of the
    original, edited, fine-tuned and retrained models and the edited/original KL to the retrained one, as bars."""
    import numpy as np

    fig_dir.mkdir(exist_ok=True)
    x = np.arange(len(rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 3.8), gridspec_kw={"wspace": 0.45})
    models = ("original", "edited", "finetuned", "retrained")
    w = 0.8 / len(models)
    for i, m in enumerate(models):
        a1.bar(x + (i - 1.5) * w, [r.get(f"unlearn/{m}/test_accuracy", float("nan")) for r in rows], w, label=m)
    for i, m in enumerate(("original", "edited")):
        a2.bar(x + (i - 0.5) * 0.4, [r.get(f"unlearn/{m}/kl_to_retrained", float("nan")) for r in rows], 0.4,
               label=m)
    sizes = [r["unlearn/n_points"] for r in rows]
    if len(set(sizes)) == 1:
        title = f"{sizes[0]:g} points edited: one Newton step vs retraining"
    else:  # each job edited its own number of points: in its label
        title, names = "one Newton step vs retraining", [f"{nm}\n|R| = {n:g}" for nm, n in zip(names, sizes, strict=True)]
    a1.set(ylabel="test accuracy", title=title)
    a2.set(yscale="log", ylabel="KL(retrained || model), test", title="distance to the retrained model")
    lo = min(r.get(f"unlearn/{m}/test_accuracy", 1.0) for r in rows for m in models)
    a1.set_ylim(max(0.0, lo - 0.05), 1.0)
    for a in (a1, a2):
        a.set_xticks(x, names, rotation=20, ha="right", fontsize=7)
        a.grid(alpha=0.3, axis="y")
        a.legend(fontsize=7)
    path = fig_dir / "unlearn.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path

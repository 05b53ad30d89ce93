"""Training and evaluation of a model on :class:`LabeledData` (the ``train`` stage's engine). What the loss, the
prediction and the quality metric are is the task's (:mod:`influencelab.tasks`; classification by default)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .data.base import LabeledData
from .errors import TrainingDivergedError, check
from .progress import progress
from .tasks import Task, resolve_task

log = logging.getLogger("influencelab")

#: training whose epoch loss reaches this multiple of its first batch's has diverged (an order of magnitude up)
DIVERGED_FACTOR = 10.0

#: the attribute of a trained model holding its training checkpoints (``trainer.checkpoints``; solver=tracin reads it)
CHECKPOINTS_ATTR = "influencelab_checkpoints"
#: prefix of the checkpoints' tensors in a cached model entry: ``@checkpoint/<i>/<state key>``, ``.../@lr``, ``.../@step``
CHECKPOINT_PREFIX = "@checkpoint/"


@dataclass
class Checkpoint:
    """The model's state after optimizer step ``step`` (1-based; the last one is the trained model) and the learning
    rate that step used (the optimizer's ``lr``: Adam's too, as TracIn implementations take it)."""

    step: int
    lr: float
    state: dict[str, torch.Tensor]


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """The steps (1-based) after which ``n`` evenly spaced checkpoints of a ``steps``-step run are saved: ``ceil(steps
    (i + 1) / n)`` for ``i < n``, the last one the end of training."""
    return [math.ceil(steps * (i + 1) / n) for i in range(n)]


def get_checkpoints(model: nn.Module) -> list[Checkpoint]:
    """The training checkpoints a model carries (``[]`` when it was trained with ``trainer.checkpoints=0``)."""
    return list(getattr(model, CHECKPOINTS_ATTR, None) or [])


def set_checkpoints(model: nn.Module, checkpoints: list[Checkpoint] | None) -> None:
    """Attach ``checkpoints`` to ``model`` (API users with their own training loop: ``Checkpoint(step, lr,
    state_dict)`` each); none removes them."""
    if checkpoints:
        object.__setattr__(model, CHECKPOINTS_ATTR, list(checkpoints))
    elif hasattr(model, CHECKPOINTS_ATTR):
        object.__delattr__(model, CHECKPOINTS_ATTR)


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's checkpoints as flat tensors (stored in its cache entry beside its state dict)."""
    out: dict[str, torch.Tensor] = {}
    for i, c in enumerate(get_checkpoints(model)):
        out.update({f"{CHECKPOINT_PREFIX}{i}/{k}": v.detach().cpu().contiguous() for k, v in c.state.items()})
        out[f"{CHECKPOINT_PREFIX}{i}/@lr"] = torch.tensor([c.lr], dtype=torch.float64)
        out[f"{CHECKPOINT_PREFIX}{i}/@step"] = torch.tensor([c.step], dtype=torch.int64)
    return out


def split_checkpoints(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[Checkpoint]]:
    """The inverse of a state dict updated with :func:`checkpoint_tensors`: ``(state dict, checkpoints)``."""
    state = {k: v for k, v in tensors.items() if not k.startswith(CHECKPOINT_PREFIX)}
    parts: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith(CHECKPOINT_PREFIX):
            i, _, name = k[len(CHECKPOINT_PREFIX):].partition("/")
            parts.setdefault(int(i), {})[name] = v
    cps = [Checkpoint(int(p.pop("@step")[0]), float(p.pop("@lr")[0]), p) for _, p in sorted(parts.items())]
    return state, cps


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a one-line error."""
    check(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"), "trainer.device", device,
          "use auto, cpu, cuda or cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        check(torch.cuda.is_available(), "trainer.device", device, "CUDA is not available here; use auto or cpu")
    return torch.device(device)


@dataclass
class Trainer:
    """Supervised training with a fixed seed (``conf/trainer/*.yaml``)."""

    epochs: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    batch_size: int = 64
    schedule: str = "constant"
    seed: int = 0
    device: str = "auto"
    #: save this many evenly spaced checkpoints (with their learning rates) on the trained model, for solver=tracin
    #: (0: none). They do not change the weights, so the trainer's cache key leaves them out; the CLI's model key
    #: adds them when > 0 (pipeline.Context.trained), and the cached model entry holds them.
    checkpoints: int = 0

    def __post_init__(self) -> None:
        check(isinstance(self.epochs, int) and self.epochs >= 1, "trainer.epochs", self.epochs, "must be an integer >= 1")
        check(isinstance(self.lr, (int, float)) and self.lr > 0, "trainer.lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, "trainer.weight_decay", self.weight_decay, "must be >= 0")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, "trainer.batch_size", self.batch_size,
              "must be an integer >= 1")
        check(self.optimizer in ("sgd", "adam", "adamw"), "trainer.optimizer", self.optimizer, "use sgd, adam or adamw")
        check(self.schedule in ("constant", "cosine"), "trainer.schedule", self.schedule, "use constant or cosine")
        check(isinstance(self.checkpoints, int) and not isinstance(self.checkpoints, bool) and self.checkpoints >= 0,
              "trainer.checkpoints", self.checkpoints, "must be an integer >= 0 (0: none; N: N evenly spaced "
              "checkpoints for solver=tracin)")
        resolve_device(self.device)

    def cache_key(self) -> dict[str, Any]:
        """What the trained weights depend on (the device is left out: same run on CPU or GPU)."""
        d = asdict(self)
        d.pop("device")
        d.pop("checkpoints")  # (saved on the side: the weights are the same)
        return d

    def fit(self, model: nn.Module, train: LabeledData, test: LabeledData | None = None,
            exclude: torch.Tensor | None = None, task: Task | None = None) -> dict[str, list[float]]:
        """Train ``model`` in place on ``task``'s loss (default: classification); returns the per-epoch history:
        ``loss``, ``train_<metric>`` and ``test_<metric>`` (the task's :attr:`~influencelab.tasks.Task.metric_name`,
        e.g. ``train_accuracy``; the train one accumulated over the epoch's batches, the test one after it).

        ``exclude`` (positions of ``train``) leaves points out while every other batch stays exactly as in the
        full run (same shuffle, same schedule): two runs then differ only by the excluded points, which is
        what a leave-one-out comparison needs (a subset would reshuffle everything)."""
        task = resolve_task(task)
        metric = task.metric_name
        device = resolve_device(self.device)
        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                                         weight_decay=self.weight_decay)
        elif self.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        steps = self.epochs * math.ceil(len(train) / self.batch_size)
        check(self.checkpoints <= steps, "trainer.checkpoints", self.checkpoints,
              f"training takes only {steps} steps; save at most that many checkpoints")
        save_at, saved, step = set(checkpoint_steps(steps, self.checkpoints)), [], 0
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if self.schedule == "cosine" else None
        history: dict[str, list[float]] = {"loss": [], f"train_{metric}": [], f"test_{metric}": []}
        dropped = None
        if exclude is not None:
            dropped = torch.zeros(len(train), dtype=torch.bool)
            dropped[torch.as_tensor(exclude, dtype=torch.long)] = True
        torch.manual_seed(self.seed)
        start: float | None = None  # the loss of the first batch: the untrained model's
        for epoch in progress(range(self.epochs), desc="epochs"):
            model.train()
            total, terms, loss_sum = 0, None, 0.0
            batches = train.batches(self.batch_size, shuffle=True, seed=self.seed * 100_003 + epoch)
            for x, y, pos in progress(batches, desc=f"epoch {epoch + 1}", total=math.ceil(len(train) / self.batch_size)):
                if dropped is not None:
                    x, y = x[~dropped[pos]], y[~dropped[pos]]
                if len(y):
                    x, y = x.to(device), y.to(device)
                    out = model(x)
                    loss = task.mean_loss(out, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    value = loss.item()
                    if start is None:
                        start = value
                    if not math.isfinite(value):
                        raise TrainingDivergedError(
                            f"training diverged: the loss became {value} at epoch {epoch + 1} (it started at "
                            f"{start:.4g}); {self._fix()}")
                    total += len(y)
                    loss_sum += value * len(y)
                    t = task.metric_terms(out.detach(), y).cpu()
                    terms = t if terms is None else terms + t
                step += 1
                if step in save_at:  # (the lr this step used: read before the schedule moves it)
                    saved.append(Checkpoint(step, float(opt.param_groups[0]["lr"]),
                                            {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}))
                if sched is not None:
                    sched.step()
            if not math.isfinite(loss_sum):
                raise TrainingDivergedError(f"training diverged at epoch {epoch + 1} (loss {loss_sum}); {self._fix()}")
            history["loss"].append(loss_sum / max(total, 1))
            self._check_health(start, history["loss"])
            history[f"train_{metric}"].append(task.metric_value(terms) if terms is not None else float("nan"))
            if test is not None:
                history[f"test_{metric}"].append(evaluate(model, test, self.batch_size * 4, device, task)[metric])
        model.eval()
        set_checkpoints(model, saved)
        return history

    def _fix(self) -> str:
        return (f"lower trainer.lr (now {self.lr:g}; try trainer.lr={self.lr / 10:g})"
                + (" or use trainer.optimizer=adam" if self.optimizer == "sgd" else ""))

    def _check_health(self, start: float | None, losses: list[float]) -> None:
        """After each epoch: an error when the epoch's mean loss is :data:`DIVERGED_FACTOR` times the first batch's
        or more (a blown-up model, which would be cached and attributed as if trained); a warning when the last
        epoch ends above the start (the model learnt nothing)."""
        if start is None or not losses:
            return
        epoch, last = len(losses), losses[-1]
        if last > DIVERGED_FACTOR * max(start, 1e-12):
            raise TrainingDivergedError(
                f"training diverged: the loss rose from {start:.4g} (first batch) to {last:.4g} (epoch {epoch}'s "
                f"mean), {last / max(start, 1e-12):.2g} times; {self._fix()}")
        if epoch == self.epochs and last > start:
            log.warning("training did not reduce the loss: it ended at %.4g (last epoch's mean) above its start "
                        "%.4g (first batch); the model is probably no better than untrained: %s, or train longer",
                        last, start, self._fix())


@torch.no_grad()
def evaluate(model: nn.Module, data: LabeledData, batch_size: int = 512,
             device: torch.device | None = None, task: Task | None = None) -> dict[str, float]:
    """The task's metric (``{metric_name: value}``, e.g. ``accuracy``) and mean loss (``loss``) of ``model`` on
    ``data`` (targets as stored, i.e. noisy labels for train)."""
    task = resolve_task(task)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, terms, loss_sum = 0, None, 0.0
    for x, y, _ in data.batches(batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += task.loss(out, y).sum().item()
        t = task.metric_terms(out, y).cpu()
        terms = t if terms is None else terms + t
        total += len(y)
    model.train(was_training)
    metric = task.metric_value(terms) if terms is not None else float("nan")
    return {task.metric_name: metric, "loss": loss_sum / max(total, 1)}


@torch.no_grad()
def per_example_loss(model: nn.Module, data: LabeledData, batch_size: int = 512,
                     task: Task | None = None) -> torch.Tensor:
    """The task's loss of every example under its stored target (the loss baseline for mislabel detection)."""
    task = resolve_task(task)
    device = next(model.parameters()).device
    model.eval()
    out = torch.empty(len(data))
    for x, y, pos in data.batches(batch_size):
        out[pos] = task.loss(model(x.to(device)), y.to(device)).float().cpu()
    return out


@torch.no_grad()
def outputs(model: nn.Module, data: LabeledData | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The model's outputs (float64, on the CPU, eval mode) for every example of ``data`` (or a tensor of inputs),
    in order: what the task's prediction, metric and divergence are computed from."""
    dev = next(model.parameters())
    model.eval()
    if isinstance(data, torch.Tensor):
        parts = [model(data[i:i + batch_size].to(dev)) for i in range(0, len(data), batch_size)]
    else:
        parts = [model(x.to(dev)) for x, _, _ in data.batches(batch_size)]
    return torch.cat([p.double().cpu() for p in parts])

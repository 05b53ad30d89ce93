"""Training and evaluation of a classifier on :class:`LabeledData` (the ``train`` stage's engine)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data.base import LabeledData
from .errors import check
from .progress import progress


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

    def __post_init__(self) -> None:
        check(isinstance(self.epochs, int) and self.epochs >= 1, "trainer.epochs", self.epochs, "must be an integer >= 1")
        check(isinstance(self.lr, (int, float)) and self.lr > 0, "trainer.lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, "trainer.weight_decay", self.weight_decay, "must be >= 0")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, "trainer.batch_size", self.batch_size,
              "must be an integer >= 1")
        check(self.optimizer in ("sgd", "adam", "adamw"), "trainer.optimizer", self.optimizer, "use sgd, adam or adamw")
        check(self.schedule in ("constant", "cosine"), "trainer.schedule", self.schedule, "use constant or cosine")
        resolve_device(self.device)

    def cache_key(self) -> dict[str, Any]:
        """What the trained weights depend on (the device is left out: same run on CPU or GPU)."""
        d = asdict(self)
        d.pop("device")
        return d

    def fit(self, model: nn.Module, train: LabeledData, test: LabeledData | None = None,
            exclude: torch.Tensor | None = None) -> dict[str, list[float]]:
        """Train ``model`` in place; returns per-epoch history (loss, train/test accuracy).

        ``exclude`` (positions of ``train``) leaves points out while every other batch stays exactly as in the
        full run (same shuffle, same schedule): two runs then differ only by the excluded points, which is
        what a leave-one-out comparison needs (a subset would reshuffle everything)."""
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
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if self.schedule == "cosine" else None
        history: dict[str, list[float]] = {"loss": [], "train_accuracy": [], "test_accuracy": []}
        dropped = None
        if exclude is not None:
            dropped = torch.zeros(len(train), dtype=torch.bool)
            dropped[torch.as_tensor(exclude, dtype=torch.long)] = True
        torch.manual_seed(self.seed)
        for epoch in progress(range(self.epochs), desc="epochs"):
            model.train()
            total, correct, loss_sum = 0, 0, 0.0
            batches = train.batches(self.batch_size, shuffle=True, seed=self.seed * 100_003 + epoch)
            for x, y, pos in progress(batches, desc=f"epoch {epoch + 1}", total=math.ceil(len(train) / self.batch_size)):
                if dropped is not None:
                    x, y = x[~dropped[pos]], y[~dropped[pos]]
                if len(y):
                    x, y = x.to(device), y.to(device)
                    out = model(x)
                    loss = F.cross_entropy(out, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += len(y)
                    loss_sum += loss.item() * len(y)
                    correct += (out.argmax(1) == y).sum().item()
                if sched is not None:
                    sched.step()
            if not math.isfinite(loss_sum):
                from .errors import InfluenceLabError

                raise InfluenceLabError(f"training diverged at epoch {epoch + 1} (loss {loss_sum}); "
                                        f"lower trainer.lr (now {self.lr})")
            history["loss"].append(loss_sum / max(total, 1))
            history["train_accuracy"].append(correct / max(total, 1))
            if test is not None:
                history["test_accuracy"].append(evaluate(model, test, self.batch_size * 4, device)["accuracy"])
        model.eval()
        return history


@torch.no_grad()
def evaluate(model: nn.Module, data: LabeledData, batch_size: int = 512,
             device: torch.device | None = None) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data`` (labels as stored, i.e. noisy for train)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for x, y, _ in data.batches(batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1)}


@torch.no_grad()
def per_example_loss(model: nn.Module, data: LabeledData, batch_size: int = 512) -> torch.Tensor:
    """Cross-entropy of every example under its stored label (the loss baseline for mislabel detection)."""
    device = next(model.parameters()).device
    model.eval()
    out = torch.empty(len(data))
    for x, y, pos in data.batches(batch_size):
        out[pos] = F.cross_entropy(model(x.to(device)), y.to(device), reduction="none").float().cpu()
    return out

"""Food-101 via torchvision (layout ``food-101/{images/, meta/{train,test}.json, meta/classes.txt}``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .base import DatasetSpec, try_download
from .images import IMAGENET_MEAN, IMAGENET_STD, eval_transform, missing


@dataclass
class Food101(DatasetSpec):
    name: str = "food101"
    image_size: int = 224
    channels: int = 3
    num_classes: int = 101
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def load_split(self, train: bool) -> tuple[Dataset, torch.Tensor]:
        import torchvision

        base = Path(self.root) / "food-101"
        need = [base / "meta", base / "images"]
        if not all(p.exists() for p in need):
            reason = try_download(lambda: torchvision.datasets.Food101(self.root, download=True), self.download,
                                  self.root)
            if not all(p.exists() for p in need):
                raise missing(self.name, [p for p in need if not p.exists()], Path(self.root), reason,
                              "food-101/{images/, meta/train.json, meta/test.json}")
        ds = torchvision.datasets.Food101(self.root, split="train" if train else "test",
                                          transform=eval_transform(self.image_size, self.mean, self.std))
        self.classes = list(ds.classes)
        return ds, torch.as_tensor(ds._labels, dtype=torch.long)

"""scikit-learn's bundled 8x8 handwritten digits (1,797 images): the embedded, no-download dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .base import DatasetSpec


@dataclass
class Digits(DatasetSpec):
    """Digits with a fixed stratified 80/20 train/test split (1,437 / 360 images)."""

    train_size: ClassVar[int | None] = 1_437
    name: str = "digits"
    image_size: int = 8
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        idx_tr, idx_te = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=0,
                                          stratify=y.numpy())
        idx = torch.as_tensor(idx_tr if train else idx_te)
        x = x[idx]
        if self.image_size != 8:
            x = torch.nn.functional.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return self.normalise(x), y[idx]

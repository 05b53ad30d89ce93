"""scikit-learn's bundled diabetes data (442 patients, 10 features, a continuous target: disease progression one
year after baseline): the embedded, no-download regression dataset (``task=regression``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import check
from .base import DatasetSpec

N_TEST = 89


@dataclass
class Diabetes(DatasetSpec):
    """Diabetes with a fixed 353 / 89 train/test split (``random_state=0``, like ``digits``); features and target
    standardised with the training split's mean and standard deviation (so a model's loss is in units of the
    target's variance). Feature vectors ``[N, 10]`` (``in_features``), float targets ``[N]``; ``num_classes: 1``
    is the model's one output."""

    train_size: ClassVar[int | None] = 442 - N_TEST
    continuous: ClassVar[bool] = True
    name: str = "diabetes"
    in_features: int | None = 10
    num_classes: int = 1
    image_size: int | None = None  # type: ignore[assignment]
    channels: int | None = None  # type: ignore[assignment]
    mean: list[float] | None = None  # type: ignore[assignment]
    std: list[float] | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.in_features == 10, "dataset.in_features", self.in_features, "the diabetes data has 10 features")
        check(self.num_classes == 1, "dataset.num_classes", self.num_classes,
              "must be 1 (the model's one output: the continuous target)")

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_diabetes
        from sklearn.model_selection import train_test_split

        d = load_diabetes()
        x = torch.tensor(d.data, dtype=torch.float64)
        y = torch.tensor(d.target, dtype=torch.float64)
        idx_tr, idx_te = train_test_split(torch.arange(len(y)).numpy(), test_size=N_TEST, random_state=0)
        tr = torch.as_tensor(idx_tr)
        x_mean, x_std = x[tr].mean(0), x[tr].std(0)
        y_mean, y_std = y[tr].mean(), y[tr].std()
        idx = tr if train else torch.as_tensor(idx_te)
        return ((x[idx] - x_mean) / x_std).float(), ((y[idx] - y_mean) / y_std).float()

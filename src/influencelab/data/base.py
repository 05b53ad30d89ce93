"""Dataset specs (validated config objects) and the labelled data every stage consumes.

A dataset YAML in ``conf/dataset/`` instantiates a subclass of :class:`DatasetSpec`; ``spec.load()``
returns ``(train, test)`` as :class:`LabeledData`, with the seeded training subset and label noise
applied. Adding a dataset = one subclass file here + one YAML.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from ..errors import ConfigError, NonFiniteError, check


class LabeledData(Dataset):
    """Inputs + targets, with the provenance later stages need.

    ``x`` is either an in-memory float tensor (images ``[N, C, H, W]``, feature vectors ``[N, F]``: fast batching)
    or a torch ``Dataset`` yielding ``(input, target)`` (image-folder datasets, decoded lazily). ``targets`` are
    what the model is trained on: class labels (long; possibly noisy) or continuous values (float, regression).
    Class labels come with ``num_classes`` (and ``classes``, their names: ``"0"``, ``"1"``, ... unless given);
    continuous targets have neither (``None``). ``clean_targets`` are the true labels when some were flipped
    (``None``: none were, the targets are the truth), ``flipped`` marks the noisy ones, ``indices`` are positions
    in the original split (default: ``0..N-1``).
    """

    def __init__(self, x: torch.Tensor | Dataset, targets: torch.Tensor, clean_targets: torch.Tensor | None = None,
                 indices: torch.Tensor | None = None, num_classes: int | None = None,
                 classes: Sequence[str] | None = None):
        self.x = x
        self.targets = targets if targets.is_floating_point() else targets.long()  # (regression targets stay float)
        if clean_targets is not None:
            clean_targets = clean_targets if clean_targets.is_floating_point() else clean_targets.long()
        self._clean = clean_targets
        self.indices = torch.arange(len(targets)) if indices is None else indices.long()
        self.num_classes = num_classes
        self.classes = list(classes) if classes is not None else \
            [str(c) for c in range(num_classes)] if num_classes is not None else None

    @property
    def has_classes(self) -> bool:
        """Whether the targets are class labels (``num_classes`` known), as label noise and repair need."""
        return self.num_classes is not None and not self.targets.is_floating_point()

    @property
    def clean_targets(self) -> torch.Tensor:
        """The true targets (the given ones where no label was flipped)."""
        return self.targets if self._clean is None else self._clean

    @property
    def flipped(self) -> torch.Tensor:
        """Boolean mask of training points whose label was flipped (all ``False`` without label noise)."""
        if self._clean is None:
            return torch.zeros(len(self.targets), dtype=torch.bool)
        diff = self.targets != self._clean
        return diff.reshape(len(diff), -1).any(1)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.x, torch.Tensor)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images([i])[0], self.targets[i]

    def inputs(self, idx: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """A batch of inputs (images, feature vectors) by position (0..len-1)."""
        if self.in_memory:
            return self.x[torch.as_tensor(idx, dtype=torch.long)]
        return torch.stack([self.x[int(i)][0] for i in idx])

    #: the inputs of image datasets (the name most stages use)
    images = inputs

    def subset(self, idx: Sequence[int] | torch.Tensor) -> LabeledData:
        """A view restricted to positions ``idx`` (labels, noise and provenance carried along)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = self.x[idx] if self.in_memory else torch.utils.data.Subset(self.x, idx.tolist())
        return LabeledData(x, self.targets[idx], None if self._clean is None else self._clean[idx],
                           self.indices[idx], self.num_classes, self.classes)

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
                x, y = self.x[pos], self.targets[pos]
                check_finite(x, y, pos, self.indices)
                yield x, y, pos
            return
        loader = DataLoader(_Positions(self), batch_size=batch_size, sampler=order.tolist(),
                            num_workers=num_workers)
        for x, y, pos in loader:
            check_finite(x, y, pos, self.indices)
            yield x, y, pos


#: a batch as a user's Dataset yields it, collated: a tensor, or a dict / tuple / list of them (nested), every
#: tensor with the examples along dim 0 (e.g. ``{"input_ids", "attention_mask", "labels"}``)
Batch = Any


def map_batch(fn: Callable[[torch.Tensor], torch.Tensor], batch: Batch) -> Batch:
    """``fn`` applied to every tensor of ``batch``, its structure kept (other leaves, e.g. strings, as they are)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_batch(fn, v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(map_batch(fn, v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_batch(fn, v) for v in batch)
    return batch


def batch_tensors(batch: Batch) -> list[torch.Tensor]:
    """The tensors of ``batch``, in a fixed order (dict keys sorted)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for k in sorted(batch, key=str) for t in batch_tensors(batch[k])]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in batch_tensors(v)]
    return []


def check_finite(x: Batch, y: Batch, pos: torch.Tensor, indices: torch.Tensor) -> None:
    """A one-line :class:`~influencelab.errors.NonFiniteError` naming the first example of a batch (``pos``: its
    positions; ``indices``: the data's indices) whose input or target holds NaN or inf: before it reaches the model
    (where it would end as a NaN loss or a failed Fisher sampling far from its cause)."""
    for what, part in (("input", x), ("target", y)):
        for t in batch_tensors(part):
            if not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all()):
                continue
            bad = ~torch.isfinite(t.reshape(len(t), -1))
            rows = bad.any(1).nonzero().flatten()
            j = int(rows[0])
            p = int(pos[j])
            value = t.reshape(len(t), -1)[j][bad[j]][0].item()
            more = f" (and {len(rows) - 1} more in its batch)" if len(rows) > 1 else ""
            raise NonFiniteError(
                f"example at position {p} (index {int(indices[p])}) has a non-finite {what} ({value}, "
                f"{int(bad[j].sum())} of its {bad.shape[1]} values){more}: repair or remove such examples (e.g. "
                f"keep those where torch.isfinite(x).all(1), or impute the missing values) and rerun")


def index_batch(batch: Batch, idx: Any) -> Batch:
    """The examples ``idx`` (an index, a slice, positions) of every tensor of ``batch`` (along dim 0)."""
    return map_batch(lambda t: t[idx], batch)


def batch_len(batch: Batch) -> int:
    """The number of examples of ``batch`` (dim 0 of its first tensor)."""
    tensors = batch_tensors(batch)
    if not tensors:
        raise ConfigError(f"a batch must hold tensors with the examples along dim 0; got {type(batch).__name__}")
    return len(tensors[0])


def batch_to(batch: Batch, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
    """``batch`` on ``device``, its floating-point tensors cast to ``dtype`` (token ids and masks keep theirs)."""
    return map_batch(lambda t: t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device),
                     batch)


class BatchData(Dataset):
    """In-memory examples of any structure (``batch``: every example collated, a dict / tuple of tensors with the
    examples along dim 0), seen by the engine through a task (:class:`~influencelab.tasks.Task`): each batch of
    examples ``b`` becomes ``(task.inputs(b), task.targets(b), positions)``, as :meth:`LabeledData.batches` yields
    ``(x, y, positions)``. What a language model's data is (``{"input_ids", "attention_mask", "labels"}``)."""

    in_memory: ClassVar[bool] = True
    has_classes: ClassVar[bool] = False
    num_classes: ClassVar[int | None] = None
    classes: ClassVar[list[str] | None] = None

    def __init__(self, batch: Batch, task: Any, indices: torch.Tensor | None = None):
        self.batch, self.task = batch, task
        n = batch_len(batch)
        for t in batch_tensors(batch):
            if len(t) != n:
                raise ConfigError(f"the tensors of a batch must all have the {n} examples along dim 0; one has "
                                  f"shape {tuple(t.shape)}")
        self.indices = torch.arange(n) if indices is None else indices.long()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Batch:
        return index_batch(self.batch, i)

    @property
    def targets(self) -> torch.Tensor:
        """Every example's targets, as the task reads them (``task.targets``)."""
        return self.task.targets(self.batch)

    def inputs(self, idx: Sequence[int] | torch.Tensor) -> Batch:
        """The model inputs (``task.inputs``) of the examples at positions ``idx``."""
        return self.task.inputs(index_batch(self.batch, torch.as_tensor(idx, dtype=torch.long)))

    images = inputs

    def subset(self, idx: Sequence[int] | torch.Tensor) -> BatchData:
        """A view restricted to positions ``idx``."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return BatchData(index_batch(self.batch, idx), self.task, self.indices[idx])

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
                skip: int = 0) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor]]:
        """Yield ``(inputs, targets, positions)`` batches (after the first ``skip``), as :meth:`LabeledData.batches`."""
        n = len(self)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle
                 else torch.arange(n))[skip * batch_size:]
        for s in range(0, len(order), batch_size):
            pos = order[s:s + batch_size]
            b = index_batch(self.batch, pos)
            x, y = self.task.inputs(b), self.task.targets(b)
            check_finite(x, y, pos, self.indices)
            yield x, y, pos

    def digest_tensors(self) -> list[torch.Tensor]:
        """What identifies the data in cache keys: every tensor of it."""
        return batch_tensors(self.batch)


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
    num_classes = int(y.max()) + 1 if not y.is_floating_point() and len(y) else None
    return LabeledData(x, y, None, torch.arange(len(y)), num_classes)


def as_data(data: LabeledData | BatchData | Dataset | DataLoader | Mapping[str, torch.Tensor],
            task: Any) -> LabeledData | BatchData:
    """A user's data as the engine reads it through ``task`` (a :class:`~influencelab.tasks.Task`): data of
    ``(input, target)`` pairs read the default way (:attr:`Task.reads_pairs`) as :class:`LabeledData`
    (:func:`as_labeled`, unchanged); anything else (a map-style Dataset yielding dicts such as
    ``{"input_ids", "attention_mask", "labels"}``, a dict of tensors, a DataLoader over either) collated once,
    with the DataLoader's own ``collate_fn`` if given, into a :class:`BatchData` split by the task."""
    if isinstance(data, LabeledData):
        return data
    if isinstance(data, BatchData):
        return data if data.task is task else BatchData(data.batch, task, data.indices)
    if isinstance(data, Mapping):
        return BatchData(dict(data), task)
    collate = default_collate
    if isinstance(data, DataLoader):
        collate, data = data.collate_fn or default_collate, data.dataset
    if getattr(task, "reads_pairs", True) and (isinstance(data, TensorDataset) or _yields_pairs(data)):
        return as_labeled(data)
    try:
        n = len(data)
    except TypeError:
        raise ConfigError(f"{type(data).__name__} is not a map-style Dataset (no len()); use a Dataset with "
                          f"__len__ and __getitem__ returning an example (a tuple or a dict of tensors)") from None
    return BatchData(collate([data[i] for i in range(n)]), task)


def _yields_pairs(data: Dataset) -> bool:
    """Whether a map-style Dataset's examples are ``(input, target)`` pairs (not dicts or longer tuples)."""
    try:
        first = data[0]
    except (IndexError, KeyError, TypeError):
        return True  # (empty or not indexable: as_labeled names the problem)
    return isinstance(first, (tuple, list)) and len(first) == 2 and not isinstance(first[0], Mapping)


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
    ``in_features``: the length of the feature vectors a tabular dataset gives instead of images (then
    ``image_size``/``channels``/``mean``/``std`` are ``None``: image models refuse it, ``mlp``/``linear`` take it).
    ``num_classes``: the number of classes, or for continuous targets (:attr:`continuous`) the number of target
    values: what the model outputs either way.
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
    in_features: int | None = None
    #: number of training images when known without reading the files (checked against ``subset`` up front)
    train_size: ClassVar[int | None] = None
    #: targets are continuous values (regression), not class labels
    continuous: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check(isinstance(self.label_noise, (int, float)) and 0.0 <= self.label_noise < 1.0,
              "dataset.label_noise", self.label_noise, "must be in [0, 1)")
        check(not (self.continuous and self.label_noise > 0), "dataset.label_noise", self.label_noise,
              f"{self.name}'s targets are continuous (no class labels to flip); set dataset.label_noise=0")
        check(self.subset is None or (isinstance(self.subset, int) and self.subset >= 1),
              "dataset.subset", self.subset, "must be a positive integer or null (all)")
        check(self.subset is None or self.train_size is None or self.subset <= self.train_size,
              "dataset.subset", self.subset, f"larger than the {self.train_size} training points of {self.name}")
        check(self.test_subset is None or (isinstance(self.test_subset, int) and self.test_subset >= 1),
              "dataset.test_subset", self.test_subset, "must be a positive integer or null (all)")
        if self.in_features is not None:  # feature vectors, no image keys
            check(isinstance(self.in_features, int) and self.in_features >= 1, "dataset.in_features",
                  self.in_features, "must be a positive integer")
            return
        check(isinstance(self.image_size, int) and self.image_size >= 1,
              "dataset.image_size", self.image_size, "must be a positive integer")
        check(len(self.mean) == self.channels and len(self.std) == self.channels,
              "dataset.mean/std", (self.mean, self.std), f"need {self.channels} value(s) each")
        check(all(s > 0 for s in self.std), "dataset.std", self.std, "must be > 0")

    def check_task(self, task: Any) -> None:
        """One-line error unless ``task`` (a :class:`~influencelab.tasks.Task`) fits the targets: class labels for a
        task with classes (classification), continuous values for one without (regression); label noise needs
        class labels. Run before any data is read."""
        name = getattr(task, "name", type(task).__name__)
        if task.has_classes and self.continuous:
            raise ConfigError(f"task={name} is invalid for dataset {self.name}: its targets are continuous values, "
                              f"not class labels; use task=regression")
        if not task.has_classes and self.label_noise > 0:
            raise ConfigError(f"dataset.label_noise={self.label_noise} is invalid with task={name}: label noise "
                              f"flips class labels and task={name} has none; set dataset.label_noise=0")
        if not task.has_classes and not self.continuous:
            raise ConfigError(f"task={name} is invalid for dataset {self.name}: its targets are class labels; use "
                              f"task=classification, or a dataset with continuous targets (e.g. dataset=diabetes)")

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
        if d["in_features"] is None:  # (image datasets: their keys as before this field existed)
            d.pop("in_features")
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
        classes = None if self.continuous else getattr(self, "classes", None)
        train = _wrap(xtr, ytr, None if self.continuous else self.num_classes, classes)
        test = _wrap(xte, yte, None if self.continuous else self.num_classes, classes)
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


def _wrap(x: torch.Tensor | Dataset, y: torch.Tensor, num_classes: int | None,
          classes: Sequence[str] | None) -> LabeledData:
    """Class labels (``num_classes`` given) as long, continuous targets as they are; no label flipped yet."""
    y = torch.as_tensor(y)
    y = y.long() if num_classes is not None else y.float()
    return LabeledData(x, y, y.clone() if num_classes is not None else None, torch.arange(len(y)), num_classes, classes)

"""A user's own images, in torchvision's ImageFolder layout or listed in CSV files, decoded lazily.

Exactly one of two layouts under ``dataset.root``:

- **folders** (torchvision ``ImageFolder``): ``root/train/<class>/*.png|jpg|...`` and
  ``root/test/<class>/...`` (subfolders of a class folder are included). Classes = the train folder names,
  sorted (as ImageFolder does); the test classes must be a subset of them.
- **CSV**: ``root/train.csv`` and ``root/test.csv`` (or ``dataset.train_csv`` / ``dataset.test_csv``,
  absolute or relative to ``root``) with a header ``path,label`` (other columns ignored): ``path`` relative to
  ``root`` or absolute, ``label`` a class name or an integer. Classes = the sorted unique train labels
  (numerically when all are integers); the test labels must be among them. Row order is sample order.

Images are decoded lazily (one at a time, as training and scoring ask for them) with the deterministic eval
transform of :mod:`.images`, converted to RGB (``channels: 3``) or grayscale (``channels: 1``).

**num_classes.** Every model config takes ``num_classes: ${dataset.num_classes}`` when the model is built,
which is before any data are loaded, so the count must be known from the config alone.
``conf/dataset/image_folder.yaml`` therefore sets ``num_classes`` to a node that Hydra instantiates
(recursively, wherever the value is interpolated) into :func:`count_classes`: it lists the train class folders
(no file walk, no image read) or reads the train CSV's labels. This needs no resolver registration and no
change to the model configs. ``dataset.num_classes=K`` replaces the node and is checked against the listing (a
mismatch is a one-line error); ``dataset.num_classes=null`` cannot reach the model as a number, so it is a
one-line error that says which K to set. From Python the default (:data:`INFER`) infers it.

**Cache key.** Trained models, factors and scores are cached by :meth:`cache_key`, so it holds everything that
changes the data: the class list, and a fingerprint of the samples *in order* (position = index for subsets,
label noise and scores), each as (path relative to ``root``, label, file size), plus the resolved ``root``
(``fingerprint: size``, the default: one ``stat`` per file at start-up). Adding, removing, renaming or
relabelling an image, or re-encoding it to a different size, invalidates the cache; the root is in the key
because two folders with the same names and sizes may still hold different pixels (uncompressed formats,
re-exports at a fixed size). Modification times are left out on purpose: copying the folder or checking it out
again would retrain everything for identical data. An in-place edit that keeps a file's exact size is not
detected; ``fingerprint: content`` hashes every file's bytes instead (reads the whole folder once per run,
exact), and since that is exact, leaves the root out so that copies of the data at other paths share the
cache.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..cache import file_sha256
from ..errors import ConfigError, DataNotFoundError, check
from .base import DatasetSpec
from .images import IMAGENET_MEAN, IMAGENET_STD, eval_transform

#: ``num_classes`` default from Python: infer it from the listing
INFER = "infer"
_NAME = "image_folder"
_HOW = ("lay it out as root/train/<class>/*.png and root/test/<class>/*.png (torchvision ImageFolder), or as "
        "root/train.csv and root/test.csv with columns path,label")

Sample = tuple[str, int]


def _extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


def _layout(root: str | None, train_csv: str | None, test_csv: str | None) -> tuple[str, Path, Path, Path]:
    """``(kind, root, train, test)``: ``kind`` is ``folder`` (train/test are directories) or ``csv``."""
    if root is None or str(root).strip() == "":
        raise ConfigError(f"dataset.root={root!r} is invalid: set dataset.root=/path/to/images; {_HOW}")
    base = Path(root).expanduser()
    if not base.is_dir():
        what = "is not a folder" if base.exists() else "does not exist"
        raise DataNotFoundError(f"{_NAME}: dataset.root={base} {what}; point dataset.root at your images and "
                                f"{_HOW}")
    base = base.resolve()
    folders = [base / "train", base / "test"]
    if train_csv is not None or test_csv is not None:  # explicit CSV keys choose the CSV layout
        files = [_under(base, train_csv or "train.csv"), _under(base, test_csv or "test.csv")]
    else:
        files = [base / "train.csv", base / "test.csv"]
        has_folders = any(p.is_dir() for p in folders)
        has_csv = any(p.is_file() for p in files)
        if has_folders and has_csv:
            found = ", ".join(str(p) for p in [*folders, *files] if p.exists())
            raise ConfigError(f"{_NAME}: {base} has both layouts ({found}); keep only one: train/ and test/ "
                              f"class folders, or train.csv and test.csv (or set dataset.train_csv and "
                              f"dataset.test_csv to use the CSV files)")
        if has_folders:
            missing = [p for p in folders if not p.is_dir()]
            if missing:
                raise DataNotFoundError(f"{_NAME}: missing {', '.join(map(str, missing))}; found "
                                        f"{', '.join(str(p) for p in folders if p.is_dir())}; {_HOW}")
            return "folder", base, *folders
        if not has_csv:
            raise DataNotFoundError(f"{_NAME}: found neither {base}/train/ + {base}/test/ nor "
                                    f"{base}/train.csv + {base}/test.csv; {_HOW}")
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise DataNotFoundError(f"{_NAME}: missing {', '.join(map(str, missing))}; {_HOW} (or set "
                                f"dataset.train_csv / dataset.test_csv)")
    return "csv", base, *files


def _under(root: Path, path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _folder_classes(train_dir: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        return find_classes(train_dir)[0]
    except FileNotFoundError:
        raise DataNotFoundError(f"{_NAME}: no class folder in {train_dir}; put each class's images in "
                                f"{train_dir}/<class>/ (e.g. {train_dir}/cat/0001.jpg)") from None


def _read_csv(path: Path, root: Path) -> list[tuple[Path, str]]:
    """``(image path, label string)`` per row of a ``path,label`` CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            if "path" not in header or "label" not in header:
                raise ConfigError(f"{_NAME}: {path} needs a header with columns path,label (found "
                                  f"{','.join(header) or 'an empty file'})")
            ip, il = header.index("path"), header.index("label")
            rows = []
            for line, row in enumerate(reader, start=2):
                if not any(c.strip() for c in row):
                    continue  # blank line
                cells = [row[i].strip() if i < len(row) else "" for i in (ip, il)]
                if not all(cells):
                    raise ConfigError(f"{_NAME}: {path} line {line} has an empty path or label "
                                      f"({','.join(row)}); every row needs path,label")
                rows.append((_under(root, cells[0]), cells[1]))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{_NAME}: {path} is not a UTF-8 text CSV ({e.reason}); write it as path,label "
                          f"lines") from None
    if not rows:
        raise DataNotFoundError(f"{_NAME}: {path} lists no images; add rows path,label (path relative to "
                                f"{root})")
    return rows


def _label_key(label: str) -> str:
    """Integer labels compare as integers (``07`` = ``7``)."""
    try:
        return str(int(label))
    except ValueError:
        return label


def _csv_classes(labels: list[str]) -> list[str]:
    keys = {_label_key(v) for v in labels}
    try:
        return sorted(keys, key=int)
    except ValueError:
        return sorted(keys)


def count_classes(root: str | None, train_csv: str | None = None, test_csv: str | None = None) -> int:
    """Number of classes from the listing only (the train class folders, or the train CSV's labels): what
    ``num_classes`` in ``conf/dataset/image_folder.yaml`` instantiates to, so models get it at composition."""
    kind, base, train, _ = _layout(root, train_csv, test_csv)
    if kind == "folder":
        return len(_folder_classes(train))
    return len(_csv_classes([label for _, label in _read_csv(train, base)]))


def _walk_split(split_dir: Path, class_to_idx: dict[str, int], train: bool) -> list[Sample]:
    from torchvision.datasets.folder import find_classes, make_dataset

    if train:
        names = list(class_to_idx)
    else:
        try:
            names = find_classes(split_dir)[0]
        except FileNotFoundError:
            raise DataNotFoundError(f"{_NAME}: no class folder in {split_dir}; put each class's test images "
                                    f"in {split_dir}/<class>/ with the class names of the train "
                                    f"folder") from None
        extra = [c for c in names if c not in class_to_idx]
        if extra:
            raise ConfigError(f"{_NAME}: test class {extra[0]!r} ({split_dir / extra[0]}) is not a train "
                              f"class (train has {_preview(list(class_to_idx), 10)}); rename or remove it, "
                              f"or add {split_dir.parent / 'train' / extra[0]}/ with training images")
    index = {c: class_to_idx[c] for c in names}
    try:  # test classes may be fewer than train's; an empty test class folder is simply absent
        samples = make_dataset(split_dir, index, _extensions(), allow_empty=not train)
    except FileNotFoundError as e:
        raise DataNotFoundError(f"{_NAME}: in {split_dir}: {e}; put images in every class folder or remove "
                                f"the empty ones") from None
    if not samples:
        raise DataNotFoundError(f"{_NAME}: no image in {split_dir}/<class>/ (extensions: "
                                f"{', '.join(_extensions())}); {_HOW}")
    return samples


def _csv_split(path: Path, root: Path, class_to_idx: dict[str, int] | None) -> tuple[list[str], list[Sample]]:
    rows = _read_csv(path, root)
    classes = _csv_classes([label for _, label in rows]) if class_to_idx is None else list(class_to_idx)
    index = class_to_idx or {c: i for i, c in enumerate(classes)}
    samples = []
    for image, label in rows:
        key = _label_key(label)
        if key not in index:
            raise ConfigError(f"{_NAME}: label {label!r} of {image} in {path} is not a train label (train "
                              f"has {_preview(classes, 10)}); fix the label or add training images of that "
                              f"class")
        samples.append((str(image), index[key]))
    return classes, samples


class _Images(Dataset):
    """``(image tensor, label)`` for a list of ``(path, label)``, decoded on access."""

    def __init__(self, samples: list[Sample], mode: str, transform):
        self.samples, self.mode, self.transform = samples, mode, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[i]
        try:
            image = default_loader(path)  # PIL, converted to RGB
        except Exception as e:
            raise DataNotFoundError(f"{_NAME}: cannot decode {path} ({type(e).__name__}: {_first_line(e)}); "
                                    f"remove or replace the file") from None
        if self.mode != "RGB":
            image = image.convert(self.mode)
        return self.transform(image), label


@dataclass
class ImageFolder(DatasetSpec):
    """Your own images (see the module docstring for the layouts, ``num_classes`` and the cache key).

    ``train_csv``/``test_csv``: CSV files (absolute or relative to ``root``; default ``root/train.csv``,
    ``root/test.csv``); setting either selects the CSV layout. ``check_images``: open every image's header at
    start-up (a fraction of a millisecond each on a warm disk: no pixel is decoded) so that an unreadable file
    stops the run before anything is trained or written. ``fingerprint``: ``size`` (paths, labels and sizes,
    plus ``root``) or ``content`` (file bytes; exact, location-free).
    """

    name: str = _NAME
    root: str | None = None
    image_size: int = 224
    channels: int = 3
    num_classes: int | str | None = INFER
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    train_csv: str | None = None
    test_csv: str | None = None
    check_images: bool = True
    fingerprint: str = "size"
    #: set from the listing (not a config key); part of :meth:`cache_key` and of the in-process split memo
    files_hash: str = field(init=False, default="")

    def __post_init__(self) -> None:
        check(self.channels in (1, 3), "dataset.channels", self.channels,
              "must be 3 (RGB) or 1 (grayscale; set dataset.mean/std to one value each, e.g. [0.5])")
        super().__post_init__()
        check(self.fingerprint in ("size", "content"), "dataset.fingerprint", self.fingerprint,
              "use size (paths, labels, sizes and root) or content (hash of every file's bytes)")
        kind, base, train_src, test_src = _layout(self.root, self.train_csv, self.test_csv)
        if kind == "folder":
            self.classes = _folder_classes(train_src)
            index = {c: i for i, c in enumerate(self.classes)}
            self._train = _walk_split(train_src, index, train=True)
            self._test = _walk_split(test_src, index, train=False)
        else:
            self.classes, self._train = _csv_split(train_src, base, None)
            self._test = _csv_split(test_src, base, {c: i for i, c in enumerate(self.classes)})[1]
        k = len(self.classes)
        where = f"{train_src} has {k} class{'es' if k != 1 else ''} ({_preview(self.classes)})"
        if k < 2:
            raise ConfigError(f"{_NAME}: {where}; classification needs at least 2 classes")
        if self.num_classes == INFER:
            self.num_classes = k
        elif self.num_classes is None:
            raise ConfigError(f"dataset.num_classes=None is invalid: the model is built from it before the "
                              f"data are read; set dataset.num_classes={k} (your folder has {k} classes) or "
                              f"drop the override (the default counts them from the listing)")
        else:
            check(isinstance(self.num_classes, int) and not isinstance(self.num_classes, bool)
                  and self.num_classes == k, "dataset.num_classes", self.num_classes,
                  f"{where}; set dataset.num_classes={k} or drop the override")
        if self.subset is not None:
            check(self.subset <= len(self._train), "dataset.subset", self.subset,
                  f"larger than the {len(self._train)} training images in {train_src}")
        self.files_hash = self._fingerprint(base)
        if self.check_images:
            self._check_headers()

    def _fingerprint(self, base: Path) -> str:
        """Hash of the class list and of every sample in order (see the module docstring)."""
        h = hashlib.sha256("\n".join(self.classes).encode())
        if self.fingerprint == "size":
            h.update(f"\0root={base}".encode())
        for split, samples in (("train", self._train), ("test", self._test)):
            h.update(f"\0{split}".encode())
            for path, label in samples:
                try:
                    size = os.stat(path).st_size
                except OSError as e:
                    raise DataNotFoundError(f"{_NAME}: cannot read {path} ({e.strerror}), listed for "
                                            f"{split}; fix the path (relative to {base} or absolute) or "
                                            f"remove the row") from None
                if size == 0:
                    raise DataNotFoundError(f"{_NAME}: {path} is empty (0 bytes); remove or replace it")
                rel = os.path.relpath(path, base) if path.startswith(str(base) + os.sep) else path
                h.update(f"\0{rel}\0{label}\0{size}".encode())
                if self.fingerprint == "content":
                    h.update(file_sha256(Path(path)).encode())
        return f"{self.fingerprint}:{h.hexdigest()[:24]}"

    def _check_headers(self) -> None:
        from PIL import Image

        bad = []
        for path, _ in (*self._train, *self._test):
            try:
                with Image.open(path):
                    pass
            except Exception as e:
                bad.append((path, e))
        if bad:
            path, e = bad[0]
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise DataNotFoundError(f"{_NAME}: cannot read {path}{more} as an image ({type(e).__name__}: "
                                    f"{_first_line(e)}); remove or replace the file(s) "
                                    f"(dataset.check_images=false skips this check)")

    def load_split(self, train: bool) -> tuple[Dataset, torch.Tensor]:
        samples = self._train if train else self._test
        labels = torch.tensor([label for _, label in samples], dtype=torch.long)
        mode = "RGB" if self.channels == 3 else "L"
        return _Images(samples, mode, eval_transform(self.image_size, self.mean, self.std)), labels

    def cache_key(self) -> dict[str, Any]:
        """Base keys (image size, channels, mean/std, subset, noise, seed) + class list + file fingerprint;
        the CSV locations are covered by the fingerprint (their rows are); ``check_images`` changes no
        data."""
        d = super().cache_key()
        for k in ("train_csv", "test_csv", "check_images"):
            d.pop(k)
        d["classes"] = list(self.classes)
        return d


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:160]


def _preview(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")

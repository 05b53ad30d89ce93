"""Oxford Flowers102 in torchvision's on-disk layout, read directly (no md5 check, so any copy of the files works).

Layout under ``root``: ``flowers-102/jpg/image_%05d.jpg``, ``flowers-102/imagelabels.mat`` (labels 1..102),
``flowers-102/setid.mat`` (``trnid``, ``valid``, ``tstid``, 1-based image ids). Train = trnid (+ valid with
``train_splits: [trnid, valid]``), test = tstid. Images are decoded lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .base import DatasetSpec, try_download
from .images import IMAGENET_MEAN, IMAGENET_STD, eval_transform, missing


class _Images(Dataset):
    def __init__(self, files: list[Path], labels: torch.Tensor, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")), int(self.labels[i])


@dataclass
class Flowers102(DatasetSpec):
    name: str = "flowers102"
    image_size: int = 224
    channels: int = 3
    num_classes: int = 102
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    train_splits: list[str] = field(default_factory=lambda: ["trnid"])

    def load_split(self, train: bool) -> tuple[Dataset, torch.Tensor]:
        from scipy.io import loadmat

        base = Path(self.root) / "flowers-102"
        need = [base / "imagelabels.mat", base / "setid.mat", base / "jpg"]
        if not all(p.exists() for p in need):
            import torchvision

            reason = try_download(lambda: torchvision.datasets.Flowers102(self.root, download=True), self.download,
                                  self.root)
            if not all(p.exists() for p in need):
                raise missing(self.name, [p for p in need if not p.exists()], Path(self.root), reason,
                              "flowers-102/{jpg/, imagelabels.mat, setid.mat}")
        labels = torch.as_tensor(loadmat(base / "imagelabels.mat")["labels"].reshape(-1).astype("int64")) - 1
        setid = loadmat(base / "setid.mat")
        ids = [int(i) for split in (self.train_splits if train else ["tstid"]) for i in setid[split].reshape(-1)]
        files = [base / "jpg" / f"image_{i:05d}.jpg" for i in ids]
        y = labels[torch.as_tensor(ids) - 1]
        return _Images(files, y, eval_transform(self.image_size, self.mean, self.std)), y

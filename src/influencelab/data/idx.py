"""MNIST-format (IDX) datasets: local-first lookup of the four files, fast numpy parsing, optional download."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..errors import DataNotFoundError
from .base import DatasetSpec, try_download

FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a numpy array."""
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


@dataclass
class IDXDataset(DatasetSpec):
    """Base for MNIST-like datasets stored as four IDX files (28x28 grayscale, 10 classes)."""

    folder: ClassVar[str] = "MNIST"  # torchvision's folder name under root
    system_dirs: ClassVar[tuple[str, ...]] = ()
    install_hint: ClassVar[str] = ""
    offline_hint: ClassVar[str] = ""  # appended to the missing-files error: a dataset that needs no files

    def search_dirs(self) -> list[Path]:
        root = Path(self.root)
        return [root / self.folder / "raw", root / self.folder, root, *map(Path, self.system_dirs)]

    def locate(self, name: str) -> Path | None:
        for d in self.search_dirs():
            for cand in (d / name, d / f"{name}.gz"):
                if cand.is_file():
                    return cand
        return None

    def _download(self) -> None:
        import torchvision

        cls = getattr(torchvision.datasets, self.folder)
        cls(root=self.root, train=True, download=True)
        cls(root=self.root, train=False, download=True)

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        names = FILES[train]
        paths = [self.locate(n) for n in names]
        if None in paths:
            how = try_download(self._download, self.download, self.root)  # None, or why it failed
            paths = [self.locate(n) for n in names]
            if None in paths:
                missing = [n for n, p in zip(names, paths, strict=True) if p is None]
                where = ", ".join(str(d) for d in self.search_dirs())
                raise DataNotFoundError(
                    f"{self.name}: missing {', '.join(missing)} (.gz or not); looked in {where}; {how}. "
                    f"Provide them: {self.install_hint}put the IDX files in {Path(self.root) / self.folder / 'raw'}/, "
                    f"or set dataset.download=true with internet access{self.offline_hint}")
        images = torch.from_numpy(read_idx(paths[0]).copy()).float().div_(255.0).unsqueeze(1)
        labels = torch.from_numpy(read_idx(paths[1]).astype(np.int64))
        if self.image_size != images.shape[-1]:
            images = torch.nn.functional.interpolate(images, size=self.image_size, mode="bilinear",
                                                     align_corners=False, antialias=True)
        return self.normalise(images), labels

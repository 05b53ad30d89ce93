"""Small stand-in files in each dataset's exact on-disk layout (the real archives cannot be fetched here).

They exercise the real loaders end to end; their pixels are random, so no number measured on them means
anything about the real datasets.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """Write ``array`` (uint8) as an IDX file (the MNIST format), gzipped or not."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


def mnist_like(root: Path, folder: str = "MNIST", n_train: int = 64, n_test: int = 32, gz: bool = False,
               seed: int = 0) -> Path:
    """The four IDX files under ``root/<folder>/raw/`` (torchvision's layout)."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return root


def _jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=80)


def flowers102(root: Path, per_split: int = 4, n_classes: int = 102, seed: int = 0) -> Path:
    """``flowers-102/{jpg/image_%05d.jpg, imagelabels.mat, setid.mat}`` with 3 x per_split images."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    base = root / "flowers-102"
    n = 3 * per_split
    labels = (np.arange(n) % n_classes) + 1  # 1-based, as in the real file
    for i in range(1, n + 1):
        _jpeg(base / "jpg" / f"image_{i:05d}.jpg", rng, (40 + i, 50))
    savemat(base / "imagelabels.mat", {"labels": labels[None, :]})
    ids = np.arange(1, n + 1)
    savemat(base / "setid.mat", {"trnid": ids[:per_split][None], "valid": ids[per_split:2 * per_split][None],
                                 "tstid": ids[2 * per_split:][None]})
    return root


def food101(root: Path, classes: tuple[str, ...] = ("apple_pie", "baby_back_ribs", "waffles"), per_class: int = 2,
            seed: int = 0) -> Path:
    """``food-101/{images/<class>/<id>.jpg, meta/{train,test}.json, meta/classes.txt}``."""
    rng = np.random.default_rng(seed)
    base = root / "food-101"
    meta = {"train": {}, "test": {}}
    for c in classes:
        for split in meta:
            ids = [f"{c}/{split}{k}" for k in range(per_class)]
            meta[split][c] = ids
            for rel in ids:
                _jpeg(base / "images" / f"{rel}.jpg", rng, (60, 45))
    (base / "meta").mkdir(parents=True, exist_ok=True)
    for split, m in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(m))
    (base / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    return root

"""Shared pieces of the image-folder datasets (Flowers102, Food101): transforms and the missing-files error."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import DataNotFoundError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """Resize (short side) + center crop to ``image_size``, to tensor, normalise: deterministic, so every pass
    over the data (training, curvature, scores) sees the same inputs."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


def missing(name: str, what: Sequence[Path], root: Path, reason: str | None, layout: str) -> DataNotFoundError:
    """The one-line error for absent dataset files."""
    return DataNotFoundError(
        f"{name}: missing {', '.join(str(p) for p in what)}; looked in {root}; {reason}. Provide them in "
        f"torchvision's layout ({layout}) under dataset.root={root}, or set dataset.download=true with internet access")

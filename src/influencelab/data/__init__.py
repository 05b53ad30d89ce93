"""Datasets: one file per dataset, each a :class:`DatasetSpec` subclass named by ``conf/dataset/*.yaml``."""

from .base import DatasetSpec, LabeledData, flip_labels

__all__ = ["DatasetSpec", "LabeledData", "flip_labels"]

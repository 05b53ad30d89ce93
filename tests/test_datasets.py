"""Datasets: real FashionMNIST (Debian package), stand-in files in the real on-disk layouts, noise and subsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import standins
from conftest import need_fashion_mnist
from influencelab.data.digits import Digits
from influencelab.data.fashion_mnist import FashionMNIST
from influencelab.data.flowers102 import Flowers102
from influencelab.data.food101 import Food101
from influencelab.data.mnist import MNIST
from influencelab.errors import ConfigError, DataNotFoundError

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_standin_idx_files_load(tmp_path, gz):
    """Stand-in IDX files (random pixels) in torchvision's layout, raw or gzipped."""
    standins.mnist_like(tmp_path, n_train=50, n_test=20, gz=gz)
    train, test = MNIST(root=str(tmp_path), download=False, subset=30, label_noise=0.2, seed=1).load()
    assert train.x.shape == (30, 1, 28, 28) and test.x.shape == (20, 1, 28, 28)
    assert int(train.flipped.sum()) == 6 and set(test.targets.tolist()) <= set(range(10))


def test_mnist_resized(tmp_path):
    standins.mnist_like(tmp_path)
    train, _ = MNIST(root=str(tmp_path), download=False, image_size=32).load()
    assert train.x.shape[-2:] == (32, 32)


def test_flowers102_standin_layout_loads_lazily(tmp_path):
    """Stand-in .mat files and JPEGs in torchvision's flowers-102 layout (random pixels)."""
    standins.flowers102(tmp_path, per_split=4)
    spec = Flowers102(root=str(tmp_path), download=False, image_size=32)
    train, test = spec.load()
    assert len(train) == 4 and len(test) == 4 and not train.in_memory
    assert train.targets.tolist() == [0, 1, 2, 3] and test.targets.tolist() == [8, 9, 10, 11]
    x = train.images([0, 3])
    assert x.shape == (2, 3, 32, 32)
    both = Flowers102(root=str(tmp_path), download=False, image_size=32, train_splits=["trnid", "valid"]).load()[0]
    assert len(both) == 8
    xb, yb, pos = next(train.batches(3))
    assert xb.shape == (3, 3, 32, 32) and pos.tolist() == [0, 1, 2]


def test_food101_standin_layout_loads(tmp_path):
    """Stand-in meta/*.json and JPEGs in torchvision's food-101 layout (random pixels)."""
    standins.food101(tmp_path, per_class=2)
    train, test = Food101(root=str(tmp_path), download=False, image_size=24, label_noise=0.5).load()
    assert len(train) == 6 and len(test) == 6
    assert int(train.flipped.sum()) == 3
    assert train.images([5]).shape == (1, 3, 24, 24)
    assert train.classes[:3] == ["apple_pie", "baby_back_ribs", "waffles"]


@pytest.mark.parametrize("spec", [MNIST, Flowers102, Food101])
def test_missing_files_one_line_error(tmp_path, spec):
    with pytest.raises(DataNotFoundError) as e:
        spec(root=str(tmp_path / "nothing"), download=False).load()
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nothing") in msg and "download" in msg


@pytest.mark.parametrize("spec, attr, value", [
    (MNIST, "mirrors", ["http://127.0.0.1:9/"]),
    (Flowers102, "_download_url_prefix", "http://127.0.0.1:9/"),
    (Food101, "_URL", "http://127.0.0.1:9/food-101.tar.gz"),
])
def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch, spec, attr, value):
    """A download that fails (here: torchvision's URL pointed at a closed local port) gives the one-line error
    and removes the folders it created; what was already in ``root`` stays."""
    import torchvision

    monkeypatch.setattr(getattr(torchvision.datasets, spec.__name__), attr, value)
    fresh, shared = tmp_path / "fresh", tmp_path / "shared"
    shared.mkdir()
    (shared / "mine.txt").write_text("keep")
    for root in (fresh, shared):
        with pytest.raises(DataNotFoundError, match="download failed"):
            spec(root=str(root), download=True).load()
    assert not fresh.exists()
    assert [p.name for p in shared.iterdir()] == ["mine.txt"]


def test_full_splits_are_decoded_once_per_process(tmp_path):
    """A second load of the same files (other subset, noise and seed, as in a sweep) reuses the decoded splits:
    it works with the files gone; a different image size is another split and reads the files again."""
    import shutil

    standins.mnist_like(tmp_path, n_train=50, n_test=20, gz=True)
    a, _ = MNIST(root=str(tmp_path), download=False).load()
    shutil.rmtree(tmp_path / "MNIST")
    b, test = MNIST(root=str(tmp_path), download=False, subset=30, label_noise=0.2, seed=1).load()
    assert torch.equal(b.x, a.x[b.indices]) and torch.equal(b.clean_targets, a.clean_targets[b.indices])
    assert int(b.flipped.sum()) == 6 and not a.flipped.any() and len(test) == 20  # applied after, never in place
    with pytest.raises(DataNotFoundError):
        MNIST(root=str(tmp_path), download=False, image_size=32).load()


def test_real_fashion_mnist():
    """The real files from Debian's dataset-fashion-mnist (found without configuring anything)."""
    need_fashion_mnist()
    spec = FashionMNIST(root="/nonexistent", download=False)
    train, test = spec.load()
    assert len(train) == 60_000 and len(test) == 10_000
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert abs(train.x.mean().item()) < 0.01 and abs(train.x.std().item() - 1) < 0.01  # normalised


def test_label_noise_exact_count_different_class_and_seeded():
    spec = Digits(label_noise=0.1, seed=3)
    a, _ = spec.load()
    b, _ = Digits(label_noise=0.1, seed=3).load()
    c, _ = Digits(label_noise=0.1, seed=4).load()
    assert int(a.flipped.sum()) == round(0.1 * len(a))
    assert (a.targets[a.flipped] != a.clean_targets[a.flipped]).all()
    assert torch.equal(a.targets, b.targets) and not torch.equal(a.flipped, c.flipped)


def test_subset_seeded_and_too_large_is_config_error():
    a, _ = Digits(subset=100, seed=0).load()
    b, _ = Digits(subset=100, seed=0).load()
    c, _ = Digits(subset=100, seed=1).load()
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    with pytest.raises(ConfigError, match="dataset.subset"):
        Digits(subset=5000).load()


def test_diabetes_split_standardised_with_training_statistics_and_float_targets():
    """353 / 89 patients, 10 features; features and target standardised with the training split's statistics (so the
    training split has mean 0 and std 1, the test split only about); targets stay float, nothing is flipped, there
    are no classes; the subset is seeded; label noise is refused in one line."""
    from influencelab.data.diabetes import Diabetes

    train, test = Diabetes().load()
    assert (len(train), len(test)) == (353, 89) and train.x.shape == (353, 10) and train.targets.dtype == torch.float32
    torch.testing.assert_close(train.x.mean(0), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.x.std(0), torch.ones(10), atol=1e-5, rtol=0)
    assert abs(float(train.targets.mean())) < 1e-5 and abs(float(train.targets.std()) - 1) < 1e-5
    assert abs(float(test.targets.mean())) > 1e-3  # the test split is standardised with the training statistics
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    raw = load_diabetes().target[train_test_split(np.arange(442), test_size=89, random_state=0)[0]]
    assert np.corrcoef(raw, train.targets.double().numpy())[0, 1] > 1 - 1e-6  # the target, rescaled
    assert not train.flipped.any() and train.classes is None and train.num_classes is None and not train.has_classes
    a, _ = Diabetes(subset=50, seed=0).load()
    b, _ = Diabetes(subset=50, seed=1).load()
    assert len(a) == 50 and not torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.targets, train.targets[torch.searchsorted(train.indices, a.indices)])
    with pytest.raises(ConfigError, match="dataset.label_noise=0.1 is invalid: diabetes's targets are continuous"):
        Diabetes(label_noise=0.1)


def test_image_dataset_cache_keys_have_no_feature_vector_key():
    """``in_features`` (feature-vector datasets) is left out of image datasets' keys: their trained models, factors
    and scores keep the keys they were cached under."""
    assert "in_features" not in Digits().cache_key() and Digits().cache_key()["type"] == "Digits"
    from influencelab.data.diabetes import Diabetes

    assert Diabetes().cache_key()["in_features"] == 10

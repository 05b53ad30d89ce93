"""Every dataset x model pair composes, instantiates and trains on one batch; every model fits EK-FAC."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import standins
from conftest import make_config
from influencelab.compose import build
from influencelab.solvers.ekfac import EKFAC

DATASETS = ["digits", "mnist", "fashion_mnist", "flowers102", "food101"]
MODELS = ["mlp", "cnn", "resnet18", "resnet50", "vit_b16"]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Stand-in files (random pixels, real on-disk layouts) for the datasets that cannot be fetched here."""
    root = tmp_path_factory.mktemp("data")
    standins.mnist_like(root, "MNIST", n_train=8, n_test=4, gz=True)
    if not FMNIST.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must install dataset-fashion-mnist")
        standins.mnist_like(root, "FashionMNIST", n_train=8, n_test=4)
    standins.flowers102(root, per_split=2)
    standins.food101(root, per_class=1)
    return root


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_pair_composes_and_runs_forward_backward(data_root, dataset, model):
    overrides = [f"dataset={dataset}", f"model={model}", f"paths.data={data_root}", "dataset.download=false"]
    if model == "vit_b16" and dataset in ("digits", "mnist", "fashion_mnist"):
        overrides.append("dataset.image_size=32")  # explicit input adaptation: ViT needs a multiple of 16
    if dataset in ("flowers102", "food101"):
        overrides.append("dataset.image_size=64" if model != "vit_b16" else "dataset.image_size=32")
    cfg = make_config(overrides)
    spec = build(cfg.dataset)
    train, _ = spec.load() if dataset != "fashion_mnist" or not FMNIST.exists() else \
        build(make_config([*overrides, "dataset.subset=8"]).dataset).load()
    torch.manual_seed(0)
    net = build(cfg.model)
    x, y, _ = next(train.batches(2))
    out = net(x)
    assert out.shape == (2, spec.num_classes)
    F.cross_entropy(out, y).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("model", MODELS + ["linear"])
def test_feature_vector_dataset_builds_mlp_and_linear_and_image_models_refuse_it(model):
    """dataset=diabetes gives feature vectors ``[N, 10]`` (``dataset.in_features``) and one output: ``mlp`` and
    ``linear`` take them; the image models refuse them in one line at composition."""
    cfg = make_config(["dataset=diabetes", "task=regression", f"model={model}"])
    torch.manual_seed(0)
    if model not in ("mlp", "linear"):
        from influencelab.errors import ConfigError

        with pytest.raises(ConfigError, match="model=.* needs images: the dataset gives feature vectors"):
            build(cfg.model)
        return
    net = build(cfg.model)
    train, _ = build(cfg.dataset).load()
    x, y, _ = next(train.batches(4))
    assert x.shape == (4, 10) and net(x).shape == (4, 1)
    assert net[1].in_features == 10


@pytest.mark.parametrize("model, size, modules", [
    ("resnet18", 16, r"re:layer1\.0\.conv1|layer4\.1\.conv1|fc"),
    ("resnet50", 16, r"re:layer1\.0\.conv2|fc"),
    ("vit_b16", 16, r"re:blocks\.11\.|head"),
])
def test_every_model_fits_ekfac_and_scores(model, size, modules):
    """Random init, small inputs: factors fit, queries precondition and score (finite, consistent)."""
    cfg = make_config(["dataset=digits", f"model={model}", f"dataset.image_size={size}", "dataset.subset=12"])
    train, test = build(cfg.dataset).load()
    torch.manual_seed(0)
    net = build(cfg.model).eval()
    s = EKFAC(modules=modules, batch_size=6)
    s.fit(net, train)
    assert len(s.layout.blocks) >= 2
    qx, qy = test.x[:2], test.targets[:2]
    pre = s.precondition(s.train_grads(net, qx, qy), 1e-3)
    scores = s.pairwise(net, pre, train.x[:4], train.targets[:4])
    assert scores.shape == (2, 4) and torch.isfinite(scores).all()
    self_scores = s.self_influence(net, qx, qy, [1e-3])[0]
    torch.testing.assert_close(self_scores.float(), torch.diagonal(pre @ s.train_grads(net, qx, qy).T),
                               rtol=1e-3, atol=1e-3 * float(self_scores.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet18", "resnet50", "vit_b16"])
def test_every_model_full_ekfac(model):
    """Every Linear/Conv2d block (eigendecompositions up to 4609 x 4609): minutes on 2 cores."""
    test_every_model_fits_ekfac_and_scores(model, 16, "all")

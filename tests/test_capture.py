"""The hooks that capture each tracked block's inputs and output gradients (solvers/blocks.py): per-example
gradients and pairwise scores equal torch.func's on a net with in-place ReLUs, strided/dilated convs, a conv
without bias and Linears (the CPU's grouped weight-gradient path for convs and the unfolded-patch path alike);
the backward pass stops at the first tracked output; a captured input changed in place after its layer ran is an
error, not a wrong gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import per_example_flat_grads
from influencelab.data.base import as_labeled
from influencelab.errors import ConfigError
from influencelab.solvers.ekfac import EKFAC
from influencelab.solvers.identity import Identity


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True),  # the first tracked output, then changed in place
        nn.Conv2d(4, 5, 3, stride=2, padding=2, dilation=2, bias=False), nn.ReLU(inplace=True),
        nn.Conv2d(5, 3, (1, 2), padding=(0, 1)), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 3 * 4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3),
    ).double().eval()


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(1)
    x, y = torch.randn(9, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    model = _net()
    return model, x, y, per_example_flat_grads(model, x, y)


@pytest.mark.parametrize("unfold", [False, True])
def test_per_example_gradients_and_pairwise_equal_torch_func(problem, unfold):
    model, x, y, want = problem
    s = EKFAC(damping=1e-2, curvature="empirical_fisher", dtype="float64", batch_size=4)
    s.fit(model, as_labeled(torch.utils.data.TensorDataset(x, y)))
    assert s.layout is not None and len(s.layout.blocks) == 5
    if unfold:  # the unfolded-patch path, which the GPU takes, and the CPU where a block's patches were made
        with s._captured(model, x, y) as cap:
            assert all(cap.a[b.name].shape[0] == len(x) for b in s.layout.blocks)  # made now, before the gradients
            got = torch.cat([s._block_grads(cap, b).flatten(1) for b in s.layout.blocks], 1)
        torch.testing.assert_close(got, torch.cat([s.layout.block(want, b).flatten(1) for b in s.layout.blocks], 1),
                                   rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(s.train_grads(model, x, y), want, rtol=1e-10, atol=1e-12)
    q = torch.randn(4, want.shape[1], dtype=torch.float64)
    pre = s.precondition(q, 1e-2)
    torch.testing.assert_close(s.pairwise(model, s.prepare_queries(pre), x, y), pre @ want.T, rtol=1e-10, atol=1e-12)
    ident = Identity(curvature="empirical_fisher", dtype="float64")
    ident.fit(model, as_labeled(torch.utils.data.TensorDataset(x, y)))
    torch.testing.assert_close(ident.self_influence(model, x, y, [0.0])[0], want.square().sum(1), rtol=1e-10,
                               atol=1e-12)


def test_backward_stops_at_the_first_tracked_output(problem):
    """With only the last Linear tracked, no layer before it is differentiated (no input gradient either)."""
    model, x, y, want = problem
    s = Identity(curvature="empirical_fisher", dtype="float64", modules="last:1")
    s.fit(model, as_labeled(torch.utils.data.TensorDataset(x, y)))
    called = []
    handles = [m.register_full_backward_hook(lambda *a, name=name: called.append(name))
               for name, m in model.named_children() if name != "9"]
    try:
        got = s.train_grads(model, x, y)
    finally:
        for h in handles:
            h.remove()
    assert called == []
    torch.testing.assert_close(got, want[:, -21:], rtol=1e-10, atol=1e-12)  # the last Linear: 6 * 3 + 3


class _ReusesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        x = x * 1.0
        h = self.conv(x)
        x.mul_(2.0)  # the conv's input, changed after the conv ran
        return self.fc(h.flatten(1)) + x.mean()


def test_an_input_changed_in_place_after_its_layer_is_an_error():
    torch.manual_seed(0)
    model = _ReusesItsInput().eval()
    x, y = torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,))
    s = Identity(curvature="empirical_fisher")
    s.fit(model, as_labeled(torch.utils.data.TensorDataset(x, y)))
    with pytest.raises(ConfigError, match="'conv' was changed in place"):
        s.train_grads(model, x, y)


def test_patch_embedding_conv_gradients_equal_torch_func():
    """A conv with kernel = stride (a ViT's patch embedding, with and without bias) takes the unfolded-patch product
    on the CPU (no grouped weight-gradient convolution): its per-example gradients, pairwise scores and
    self-influence equal torch.func's."""
    from influencelab.solvers.blocks import _patchify

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 2, stride=2), nn.ReLU(), nn.Conv2d(4, 3, (1, 3), stride=(1, 3), bias=False),
                          nn.Flatten(), nn.Linear(3 * 3 * 1, 3)).double().eval()
    assert _patchify(model[0]) and _patchify(model[2]) and not _patchify(nn.Conv2d(2, 4, 2, stride=1))
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    want = per_example_flat_grads(model, x, y)
    s = Identity(curvature="empirical_fisher", dtype="float64")
    s.fit(model, as_labeled(torch.utils.data.TensorDataset(x, y)))
    torch.testing.assert_close(s.train_grads(model, x, y), want, rtol=1e-10, atol=1e-12)
    q = torch.randn(3, want.shape[1], dtype=torch.float64)
    torch.testing.assert_close(s.pairwise(model, s.prepare_queries(q), x, y), q @ want.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.self_influence(model, x, y, [0.0])[0], want.square().sum(1), rtol=1e-10, atol=1e-12)


class _ViewsItsFeatures(nn.Module):
    """The classic tutorial CNN: ``.view``s a conv's output as NCHW, which images in channels-last order break."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).view(x.shape[0], -1))


@pytest.mark.parametrize("views", [False, True])
def test_float32_cpu_images_run_channels_last_and_equal_the_float64_gradients(views):
    """On the CPU, float32 images into a model with convs are passed in channels-last order (faster pooling; the
    model is not touched), unless the model cannot take them (it ``.view``s a conv's output): both ways the
    per-example gradients, pairwise scores and self-influence equal torch.func's float64 ones to float32 accuracy."""
    from influencelab.solvers.blocks import _CHANNELS_LAST_OK

    torch.manual_seed(3)
    model = (_ViewsItsFeatures() if views else nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 1 * 1, 3))).eval()
    x, y = torch.randn(7, 1, 6, 6), torch.randint(0, 3, (7,))
    want = per_example_flat_grads(copy.deepcopy(model).double(), x.double(), y).float()
    s = Identity(curvature="empirical_fisher")
    s.fit(model, as_labeled(torch.utils.data.TensorDataset(x, y)))
    seen = []
    conv = model.conv if views else model[0]  # (its output: with one input channel, the input's order is moot)
    h = conv.register_forward_hook(lambda m, a, out: seen.append(not out.is_contiguous()))
    got = s.train_grads(model, x, y)
    h.remove()
    assert _CHANNELS_LAST_OK[model] is not views and seen[-1] is not views
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    q = torch.randn(4, want.shape[1])
    torch.testing.assert_close(s.pairwise(model, s.prepare_queries(q), x, y), q @ want.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.self_influence(model, x, y, [0.0])[0], want.square().sum(1), rtol=1e-4, atol=1e-6)

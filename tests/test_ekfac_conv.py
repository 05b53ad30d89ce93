"""EK-FAC's fast paths on conv blocks (issue #18) against a direct float64 computation from per-example gradients
built here with torch.func: squared gradients in the eigenbasis through position pairs (one matmul instead of
``[b, out, in]`` rotated gradients; one position included), formed chunk by chunk for blocks with more positions
(chunks smaller than the batch included), either path for every block, and the eigendecomposition that splits off
the exactly-zero rows of a covariance (a conv on a 1x1 map only ever sees padding in 8 of its 9 taps)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import per_example_flat_grads
from influencelab.data.base import as_labeled
from influencelab.solvers import ekfac
from influencelab.solvers.ekfac import EKFAC, _eigh

DAMPINGS = [1e-3, "auto"]


def _net() -> nn.Module:
    """Every kind of block on 4x4 inputs: T=16 (with bias), T=4 (strided, no bias), T=1 conv on a 1x1 map
    (padding-only taps: zero rows in its input covariance) and a Linear (one position, bias)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Conv2d(5, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6, 3),
    ).double().eval()


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(1)
    x, y = torch.randn(23, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (23,))
    model = _net()
    return model, x, y, per_example_flat_grads(model, x, y)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> EKFAC:
    s = EKFAC(damping=DAMPINGS, curvature="empirical_fisher", dtype="float64", batch_size=batch_size)
    s.fit(model, as_labeled(torch.utils.data.TensorDataset(x, y)))
    return s


def _rotated(s: EKFAC, g: torch.Tensor, i: int) -> torch.Tensor:
    """``Q_S^T G_i Q_A`` of block ``i`` for every example, from the flat per-example gradients ``g``."""
    assert s.layout is not None
    qa, qs = s.state[f"{i}.QA"], s.state[f"{i}.QS"]
    return qs.T @ s.layout.block(g, s.layout.blocks[i]) @ qa


# position pairs for T <= pairs_max_t, else rotated gradients formed one example at a time, a few (the last chunk
# shorter) or the whole batch at once: every block through either path
@pytest.mark.parametrize(("pairs_max_t", "chunk_bytes"), [(0, 1), (0, 2000), (ekfac.PAIRS_MAX_T, 2000),
                                                          (ekfac.PAIRS_MAX_T, ekfac.CHUNK_BYTES["cpu"]), (100, 1)])
@pytest.mark.parametrize("batch_size", [5, 64])
def test_corrected_eigenvalues_and_self_influence_equal_per_example_gradients(problem, monkeypatch, pairs_max_t,
                                                                             chunk_bytes, batch_size):
    model, x, y, g = problem
    monkeypatch.setattr(ekfac, "PAIRS_MAX_T", pairs_max_t)
    monkeypatch.setitem(ekfac.CHUNK_BYTES, "cpu", chunk_bytes)
    s = _fit(model, x, y, batch_size)
    assert s.layout is not None and [b.name for b in s.layout.blocks] == ["0", "2", "5", "8"]
    for i in range(len(s.layout.blocks)):  # Λ = mean_i (Q_S^T G_i Q_A)^2
        torch.testing.assert_close(s.state[f"{i}.lambda"], _rotated(s, g, i).square().mean(0), rtol=1e-9,
                                   atol=1e-12)
    # g^T (G + λI)^-1 g through the generic path (precondition of the explicit gradients)
    want = torch.stack([(s.precondition(g, d) * g).sum(1) for d in DAMPINGS])
    got = torch.cat([s.self_influence(model, x[i:i + 7], y[i:i + 7], DAMPINGS) for i in range(0, len(x), 7)], 1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_eigenbases_are_orthonormal_and_diagonalise_the_input_covariances(problem):
    """``Q_A`` of every block diagonalises ``A = E[sum_t [a_t, 1][a_t, 1]^T]`` built here from the inputs."""
    model, x, y, _ = problem
    s = _fit(model, x, y, 64)
    assert s.layout is not None
    inputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda m, inp, name=name: inputs.update({name: inp[0].detach()}))
               for name, m in s.layout.modules.items()]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    for i, b in enumerate(s.layout.blocks):
        m = s.layout.modules[b.name]
        a = (F.unfold(inputs[b.name], m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
             if isinstance(m, nn.Conv2d) else inputs[b.name][:, None]).flatten(0, 1)
        if b.bias is not None:
            a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        cov = a.T @ a / len(x)
        if b.name == "5":  # the conv on a 1x1 map: 8 of its 9 taps only ever see padding
            assert int((cov == 0).all(0).sum()) >= 5 * 8
        qa = s.state[f"{i}.QA"]
        torch.testing.assert_close(qa.T @ qa, torch.eye(len(qa), dtype=qa.dtype), rtol=0, atol=1e-12)
        d = qa.T @ cov @ qa
        torch.testing.assert_close(d, torch.diag(d.diagonal()), rtol=0, atol=1e-10 * float(cov.diagonal().max()))


def test_eigh_with_zero_rows_equals_lapack():
    torch.manual_seed(0)
    f = torch.randn(9, 4, dtype=torch.float64)
    m = torch.zeros(12, 12, dtype=torch.float64)
    live = torch.tensor([0, 2, 3, 5, 6, 8, 9, 11, 1])  # 3 zero rows / columns (4, 7, 10), a rank-4 live block
    m[live[:, None], live] = f @ f.T
    evals, evecs = _eigh(m)
    torch.testing.assert_close(evals, torch.linalg.eigh(m).eigenvalues, rtol=0, atol=1e-12)
    assert bool((evals[1:] >= evals[:-1]).all())
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(12, dtype=m.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, m, rtol=0, atol=1e-12)
    for r in (4, 7, 10):  # the zero rows' eigenvectors are theirs alone
        assert float(evecs[r].abs().max()) == 1.0 and int((evecs[r] != 0).sum()) == 1
    zeros = torch.zeros(3, 3, dtype=torch.float64)  # all rows zero: the plain decomposition
    torch.testing.assert_close(_eigh(zeros)[1].abs().sum(0), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("name", ["ekfac", "kfac", "cg"])
def test_precondition_in_place_equals_precondition(problem, name):
    """``precondition_`` (what ``Attributor.pairwise`` uses on its own query gradients) overwrites its input with
    what :meth:`precondition` returns: EK-FAC/K-FAC block by block without a copy, other solvers through one."""
    from influencelab.compose import solver_config

    model, x, y, g = problem
    s = solver_config(name, {"damping": 1e-2, "curvature": "empirical_fisher", "dtype": "float64"})
    s.setup(model)
    s.fit(model, as_labeled(torch.utils.data.TensorDataset(x, y)))
    if name == "cg":
        s.bind(model, as_labeled(torch.utils.data.TensorDataset(x, y)))
    v = g[:5].clone()
    expected = s.precondition(v, 1e-2)
    assert torch.equal(v, g[:5]) and not torch.allclose(expected, v)  # precondition leaves its input alone
    out = s.precondition_(v, 1e-2)
    assert out.data_ptr() == v.data_ptr()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

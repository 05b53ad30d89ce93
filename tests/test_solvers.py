"""The math of every solver against dense ground truth built independently here with torch.func (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from influencelab.data.digits import Digits
from influencelab.errors import ConfigError, SolverDivergedError
from influencelab.models import cnn, mlp
from influencelab.solvers.cg import CG
from influencelab.solvers.ekfac import EKFAC, KFAC
from influencelab.solvers.exact import Exact
from influencelab.solvers.grads import per_sample_grads
from influencelab.solvers.identity import Identity
from influencelab.solvers.layout import ParamLayout
from influencelab.solvers.lissa import LiSSA

F64 = {"dtype": "float64"}


def _data(n: int = 48):
    train, test = Digits(subset=n, seed=0).load()
    return train, test


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = mlp(10, 1, 8, hidden=8) if kind == "mlp" else cnn(10, 1, 8, channels=(2, 3), hidden=8)
    return m.double().eval()


def _short_train(model: torch.nn.Module, data, steps: int = 30) -> torch.nn.Module:
    """A few full-batch steps so the curvature is that of a (partly) trained model."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = data.x.double(), data.targets
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


class Reference:
    """Dense curvatures in *parameter order* (concatenated ``named_parameters``), independent of the library."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [s.numel() for s in self.shapes]
        return {n: t.reshape(s) for n, t, s in zip(self.names, theta.split(sizes), self.shapes, strict=True)}

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.params(theta), (x,))

    def ggn(self, x: torch.Tensor) -> torch.Tensor:
        J = jacrev(self.logits)(self.theta, x)  # [n, C, P]
        p = torch.softmax(self.logits(self.theta, x), -1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return torch.einsum("ncp,ncd,ndq->pq", J, H, J) / len(x)

    def hessian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return hessian(lambda t: F.cross_entropy(self.logits(t, x), y))(self.theta)

    def grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return vmap(grad(lambda t, xi, yi: F.cross_entropy(self.logits(t, xi[None]), yi[None])),
                    in_dims=(None, 0, 0))(self.theta, x, y)

    def empirical_fisher(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = self.grads(x, y)
        return g.T @ g / len(x)

    def dense(self, kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return {"fisher": lambda: self.ggn(x), "hessian": lambda: self.hessian(x, y),
                "empirical_fisher": lambda: self.empirical_fisher(x, y)}[kind]()


def to_param_order(layout: ParamLayout, model: torch.nn.Module, flat: torch.Tensor) -> torch.Tensor:
    d = layout.unflatten(flat, model)
    return torch.cat([d[n].reshape(len(flat), -1) for n, _ in model.named_parameters()], dim=1)


def from_param_order(layout: ParamLayout, model: torch.nn.Module, flat: torch.Tensor) -> torch.Tensor:
    sizes = [p.numel() for _, p in model.named_parameters()]
    parts = {n: t.reshape(len(flat), *p.shape) for (n, p), t in zip(model.named_parameters(), flat.split(sizes, 1),
                                                                     strict=True)}
    return layout.flatten(parts)


@pytest.fixture(scope="module")
def setup():
    train, test = _data()
    out = {}
    for kind in ("mlp", "cnn"):
        model = _short_train(_model(kind), train)
        ref = Reference(model)
        x, y = train.x.double(), train.targets
        qx, qy = test.x[:3].double(), test.targets[:3]
        out[kind] = (model, ref, train, x, y, ref.grads(qx, qy))
    return out


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("curvature", ["fisher", "hessian", "empirical_fisher"])
def test_exact_equals_dense_solve(setup, kind, curvature):
    model, ref, train, x, y, gq = setup[kind]
    lam = 0.5 if curvature == "hessian" else 1e-2
    G = ref.dense(curvature, x, y)
    expected = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), gq.T).T
    s = Exact(damping=lam, curvature=curvature, batch_size=7, **F64)
    s.fit(model, train)
    got = to_param_order(s.layout, model, s.precondition(from_param_order(s.layout, model, gq), lam))
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("curvature", ["fisher", "hessian", "empirical_fisher"])
def test_cg_converges_to_exact(setup, kind, curvature):
    model, ref, train, x, y, gq = setup[kind]
    lam = 0.5 if curvature == "hessian" else 1e-2
    ex = Exact(damping=lam, curvature=curvature, **F64)
    ex.fit(model, train)
    cg = CG(damping=lam, curvature=curvature, tol=1e-12, max_iter=1000, batch_size=16, **F64)
    cg.fit(model, train)
    v = from_param_order(ex.layout, model, gq)
    a, b = cg.precondition(v, lam), ex.precondition(v, lam)
    assert ((a - b).norm(dim=1) / b.norm(dim=1)).max() <= 1e-6


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_lissa_with_enough_depth_is_within_2_percent(setup, kind):
    model, ref, train, x, y, gq = setup[kind]
    lam = 0.2
    ex = Exact(damping=lam, **F64)
    ex.fit(model, train)
    # full-batch products (batch = training set) isolate the recursion from sampling noise; the error after J
    # steps is at most (1 - λ/s)^J, so J = 5 s / λ leaves < 1%
    li = LiSSA(damping=lam, batch_size=len(train), **F64)
    li.fit(model, train)
    li.depth = int(5 * (li._scale + lam) / lam) + 1  # auto scale: s = 2 λ_max + λ
    assert li.depth < 20_000
    v = from_param_order(ex.layout, model, gq)
    a, b = li.precondition(v, lam), ex.precondition(v, lam)
    assert ((a - b).norm(dim=1) / b.norm(dim=1)).max() <= 0.02


def test_lissa_auto_scale_converges_at_a_damping_far_above_the_curvature(setup):
    """``scale=auto`` includes the damping (s = 2 λ_max + λ): at λ = 20 x 2 λ_max, where s = 2 λ_max alone
    diverges, the recursion contracts fast and equals the exact solve."""
    model, _, train, _, _, gq = setup["mlp"]
    li = LiSSA(damping=1.0, depth=60, batch_size=len(train), **F64)
    li.fit(model, train)
    lam = 20 * li._scale
    ex = Exact(damping=lam, **F64)
    ex.fit(model, train)
    v = from_param_order(ex.layout, model, gq)
    a, b = li.precondition(v, lam), ex.precondition(v, lam)
    assert ((a - b).norm(dim=1) / b.norm(dim=1)).max() <= 1e-8
    li.scale = li._scale  # the same scale fixed by hand, without the damping: diverges
    with pytest.raises(SolverDivergedError):
        li.precondition(v, lam)


def test_lissa_several_dampings_in_one_pass_equal_separate(setup):
    model, _, train, _, _, gq = setup["mlp"]
    li = LiSSA(damping=[0.1, 0.01], depth=30, batch_size=8, **F64)
    li.fit(model, train)
    v = from_param_order(li.layout, model, gq)
    both = li.precondition_all(v, [0.1, 0.01])
    torch.testing.assert_close(both[0], li.precondition(v, 0.1))
    torch.testing.assert_close(both[1], li.precondition(v, 0.01))


def test_lissa_divergence_is_reported(setup):
    model, _, train, _, _, gq = setup["mlp"]
    li = LiSSA(damping=1e-3, depth=200, batch_size=16, scale=1e-3, **F64)
    li.fit(model, train)
    with pytest.raises(SolverDivergedError, match="scale"):
        li.precondition(from_param_order(li.layout, model, gq), 1e-3)


def test_exact_refuses_large_models(setup):
    model, *_ = setup["mlp"]
    with pytest.raises(ConfigError, match="max_params"):
        Exact(max_params=100, **F64).setup(model)


def test_per_sample_grads_equal_autograd_loop(setup):
    for kind in ("mlp", "cnn"):
        model, ref, train, x, y, _ = setup[kind]
        layout = ParamLayout(model)
        got = to_param_order(layout, model, per_sample_grads(model, layout, x[:5], y[:5]))
        for i in range(5):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            loop = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            torch.testing.assert_close(got[i], loop)


def _dense_kfac_block(s: EKFAC, i: int) -> torch.Tensor:
    qa, qs, lam = s.state[f"{i}.QA"].double(), s.state[f"{i}.QS"].double(), s.state[f"{i}.lambda"].double()
    Q = torch.kron(qs, qa)
    return Q @ torch.diag(lam.reshape(-1)) @ Q.T


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_kfac_and_ekfac_exact_for_one_example_empirical_fisher(setup, cls):
    model, _, train, *_ = setup["mlp"]
    one = train.subset([3])
    s = cls(curvature="empirical_fisher", **F64)
    s.fit(model, one)
    ex = Exact(curvature="empirical_fisher", **F64)
    ex.fit(model, one)
    G = ex.dense()
    for i, b in enumerate(s.layout.blocks):  # Linear blocks, one position: G_block = (s s^T) kron (a a^T)
        torch.testing.assert_close(_dense_kfac_block(s, i), G[b.slice, b.slice], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ekfac_closer_than_kfac_to_block_diagonal(setup, kind):
    model, _, train, *_ = setup[kind]
    ex = Exact(curvature="empirical_fisher", **F64)
    ex.fit(model, train)
    G = ex.dense()
    fits = {}
    for cls in (KFAC, EKFAC):
        s = cls(curvature="empirical_fisher", **F64)
        s.fit(model, train)
        fits[cls.name] = sum(float((_dense_kfac_block(s, i) - G[b.slice, b.slice]).norm() ** 2)
                             for i, b in enumerate(s.layout.blocks)) ** 0.5
    assert fits["ekfac"] < fits["kfac"]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ekfac_precondition_is_the_inverse_of_its_dense_matrix(setup, kind):
    model, _, train, _, _, gq = setup[kind]
    s = EKFAC(damping=[1e-3, "auto"], **F64)
    s.fit(model, train)
    v = from_param_order(s.layout, model, gq)
    for d in s.dampings:
        got = s.precondition(v, d)
        for i, b in enumerate(s.layout.blocks):
            lam = 0.1 * float(s.state[f"{i}.lambda"].mean()) if d == "auto" else d
            M = _dense_kfac_block(s, i) + lam * torch.eye(b.size, dtype=torch.float64)
            torch.testing.assert_close(got[:, b.slice], torch.linalg.solve(M, v[:, b.slice].T).T)
    both = s.precondition_all(v, s.dampings)
    torch.testing.assert_close(both[1], s.precondition(v, "auto"))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ekfac_specialised_paths_equal_generic(setup, kind):
    """Hook-based gradients, self-influence and pairwise equal torch.func per-example gradients."""
    model, _, train, x, y, _ = setup[kind]
    s = EKFAC(damping=[1e-2, 1e-1], **F64)
    s.fit(model, train)
    g = per_sample_grads(model, s.layout, x[:9], y[:9])
    torch.testing.assert_close(s.train_grads(model, x[:9], y[:9]), g)
    expected = torch.stack([(s.precondition(g, d) * g).sum(1) for d in s.dampings])
    torch.testing.assert_close(s.self_influence(model, x[:9], y[:9], s.dampings), expected)
    pre = s.precondition(g, 1e-2)
    pairwise = s.pairwise(model, pre, x[:9], y[:9])
    torch.testing.assert_close(torch.diagonal(pairwise), expected[0])  # self = diagonal of pairwise


def test_ekfac_factors_do_not_depend_on_batch_size(setup):
    model, _, train, *_ = setup["cnn"]
    a, b = (EKFAC(curvature="empirical_fisher", batch_size=bs, **F64) for bs in (5, 48))
    a.fit(model, train)
    b.fit(model, train)
    for k in a.state:
        if k.endswith("lambda"):
            torch.testing.assert_close(a.state[k], b.state[k])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_identity_is_gradient_dot_product(setup, name):
    """The hook-captured gradients, pairwise and self scores equal torch.func per-example gradients."""
    model, _, train, x, y, _ = setup[name]
    s = Identity(dtype="float64")
    s.setup(model)
    g = per_sample_grads(model, s.layout, x[:6], y[:6])
    torch.testing.assert_close(s.train_grads(model, x[:6], y[:6]), g)
    torch.testing.assert_close(s.self_influence(model, x[:6], y[:6], [0.0, 1.0]), (g * g).sum(1).expand(2, -1))
    torch.testing.assert_close(s.pairwise(model, g[:2], x[:6], y[:6]), g[:2] @ g.T)


def test_identity_falls_back_to_torch_func_for_grouped_convs():
    """A grouped conv cannot be captured by the hooks; identity scores it through torch.func instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    s = Identity(dtype="float64")
    s.setup(model)
    g = per_sample_grads(model, s.layout, x, y)
    torch.testing.assert_close(s.self_influence(model, x, y, [0.0])[0], (g * g).sum(1))
    torch.testing.assert_close(s.pairwise(model, g[:2], x, y), g[:2] @ g.T)


def test_modules_selection_and_errors(setup):
    model, *_ = setup["cnn"]
    assert [b.name for b in ParamLayout(model, "last:2").blocks] == ["7", "9"]
    assert [b.name for b in ParamLayout(model, "re:^[03]$").blocks] == ["0", "3"]
    assert ParamLayout(model, ["9"]).untracked == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias"]
    for bad in ("last:0", "re:zzz", ["nope"], "everything"):
        with pytest.raises(ConfigError, match="solver.modules"):
            ParamLayout(model, bad)


@pytest.mark.parametrize("cls", [EKFAC, Identity])
def test_bf16_autocast_gradients_and_scores_track_float32(setup, cls):
    """``solver.autocast=bf16`` runs the gradient passes in bfloat16 (results change at bf16 precision) while
    sums and inverses stay in float32/float64: self-influence keeps its ranking."""
    from scipy.stats import spearmanr

    model64, _, train, x, y, _ = setup["cnn"]
    model = copy.deepcopy(model64).float()
    full, amp = cls(damping=1e-2, batch_size=16), cls(damping=1e-2, batch_size=16, autocast="bf16")
    for s in (full, amp):
        s.fit(model, train) if cls is EKFAC else s.setup(model)
    xf = x.float()
    g, g_amp = full.train_grads(model, xf, y), amp.train_grads(model, xf, y)
    assert g_amp.dtype == torch.float32 and not torch.equal(g, g_amp)  # bf16 passes really ran
    assert float((g - g_amp).norm() / g.norm()) < 0.05
    a, b = (s.self_influence(model, xf, y, [1e-2])[0] for s in (full, amp))
    assert spearmanr(a.numpy(), b.numpy()).statistic > 0.98


def test_autocast_config_errors():
    with pytest.raises(ConfigError, match="solver.autocast"):
        EKFAC(autocast="int8")
    with pytest.raises(ConfigError, match="solver.dtype=float32"):
        EKFAC(autocast="bf16", dtype="float64")

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
from influencelab.models import cnn, linear, mlp
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
def test_ggn_products_from_cached_jacobians_equal_the_dense_ggn(setup, kind):
    """CG's fast path (per-example output Jacobians kept in memory, two matrix products per call) and the
    jvp/vjp path both give the dense GGN's products; the cache is used only when it fits its budget."""
    from influencelab.solvers.curvature import Curvature

    model, ref, train, x, y, gq = setup[kind]
    layout = ParamLayout(model, "all")
    V = from_param_order(layout, model, torch.randn(5, len(ref.theta), dtype=torch.float64,
                                                    generator=torch.Generator().manual_seed(0)))
    expected = to_param_order(layout, model, V) @ ref.ggn(x)  # G symmetric: (G V^T)^T
    n_c_p = len(train) * 10 * layout.size * 8  # bytes of all Jacobians in float64
    for budget, cached in ((0, False), (n_c_p - 1, False), (n_c_p, True)):
        curv = Curvature(model, layout, "fisher", jacobian_cache_bytes=budget)
        got = curv.mean_product(V, train, 7)
        assert (curv._jacobians is not None and curv._jacobians[1] is not None) == cached
        torch.testing.assert_close(to_param_order(layout, model, got), expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(curv.mean_product(V, train, 7), got, rtol=1e-12, atol=1e-14)  # (a second call)
    with pytest.raises(ConfigError, match="solver.jacobian_cache_gb"):
        CG(jacobian_cache_gb=-1)


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


@pytest.mark.parametrize("name", ["exact", "cg", "lissa"])
def test_precondition_all_equals_independent_dense_solves(setup, name):
    """``precondition_all(v, [λ1, λ2, λ3])[i]`` (LiSSA's own joint recursion; the base class's loop for exact and
    CG) against ``torch.linalg.solve(G + λi I, v)`` on the dense GGN built here with torch.func, at dampings
    that differ by 4x so that a row solved with another row's damping is far off."""
    model, ref, train, x, _, gq = setup["mlp"]
    G = ref.ggn(x)
    lam_max = float(torch.linalg.eigvalsh(G).max())  # 0.24 on this model
    dampings = [0.25 * lam_max, lam_max, 4 * lam_max]
    if name == "exact":
        s, tol = Exact(damping=dampings, **F64), 1e-8
    elif name == "cg":
        s, tol = CG(damping=dampings, tol=1e-12, max_iter=1000, batch_size=len(train), **F64), 1e-8
    else:  # full-batch products: the error after J steps is at most (1 - λ/s)^J with s = 2 λ_max + λ, so at the
        # smallest damping (1 - 1/9)^100 < 1e-5 (measured 4e-6, 2e-15, 2e-15; exact 4e-15, CG 6e-13)
        s, tol = LiSSA(damping=dampings, depth=100, batch_size=len(train), **F64), 1e-3
    s.fit(model, train)
    v = from_param_order(s.layout, model, gq)
    out = s.precondition_all(v, dampings)
    assert out.shape == (3, *v.shape)
    eye = torch.eye(len(G), dtype=G.dtype)
    for i, lam in enumerate(dampings):
        expected = torch.linalg.solve(G + lam * eye, gq.T).T
        got = to_param_order(s.layout, model, out[i])
        assert ((got - expected).norm(dim=1) / expected.norm(dim=1)).max() <= tol, (name, lam)


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


def _layout_to_params(layout: ParamLayout, model: torch.nn.Module) -> torch.Tensor:
    """``M [P, P]`` with ``v_param = v_layout @ M`` (so a layout-order matrix ``K`` is ``M^T K M`` in parameter order)."""
    return to_param_order(layout, model, torch.eye(layout.size, dtype=torch.float64))


@pytest.fixture
def one_thread():
    """Hundreds of forward/backward passes of a tiny model: one intra-op thread (on a busy 2-core machine, handing
    each tiny op to a second thread made a 64-draw fit take 1-10 s instead of 0.06 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_true_fisher_kfac_and_ekfac_converge_to_the_exact_ggn(one_thread, cls):
    """``curvature=fisher`` (labels sampled from the model, ``fisher_samples`` draws per example), as every reported
    result uses, against the exact GGN. One Linear layer on copies of one image (one position): the GGN is then
    ``(diag p - p p^T) ⊗ [a, 1][a, 1]^T``, a Kronecker product, so K-FAC's and EK-FAC's expectations are exactly it
    and the sampling error must shrink like 1/sqrt(draws). Measured (solver seed 0; over seeds 0-14 in brackets):
    relative Frobenius error of the curvature at 1 / 16 / 256 draws per example, EK-FAC 0.54 / 0.12 / 0.042
    [256: 0.021-0.052], K-FAC 0.35 / 0.095 / 0.043 [256: 0.026-0.051]; error of the damped inverse (λ = 0.1 λ_max)
    on query gradients at 256: EK-FAC 0.018 [<= 0.030], K-FAC 0.005 [<= 0.043]; ratio 256 / 1 <= 0.15."""
    train, test = _data()
    torch.manual_seed(0)
    model = linear(10, 1, 8).double().eval()  # at initialisation: the predicted p is spread over the classes
    data = train.subset([3] * 16)
    ref = Reference(model)
    G = ref.ggn(data.x.double())  # parameter order, independent of the library
    lam = 0.1 * float(torch.linalg.eigvalsh(G).max())
    gq = ref.grads(test.x[:3].double(), test.targets[:3])
    expected = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), gq.T).T
    curv_err, inv_err = {}, {}
    for m in (1, 16, 256):
        s = cls(fisher_samples=m, batch_size=16, seed=0, **F64)
        s.fit(model, data)
        M = _layout_to_params(s.layout, model)
        K = M.T @ _dense_kfac_block(s, 0) @ M  # the one block is the whole model
        curv_err[m] = float((K - G).norm() / G.norm())
        got = to_param_order(s.layout, model, s.precondition(from_param_order(s.layout, model, gq), lam))
        inv_err[m] = float(((got - expected).norm(dim=1) / expected.norm(dim=1)).max())
    assert curv_err[256] < curv_err[16] < curv_err[1], curv_err
    assert curv_err[256] < 0.25 * curv_err[1] and curv_err[256] < 0.1, curv_err
    assert inv_err[256] < 0.25 * inv_err[1] and inv_err[256] < 0.08, inv_err


def test_true_fisher_ekfac_eigenvalues_are_the_exact_ggn_diagonal_in_its_eigenbasis(one_thread):
    """With many distinct examples EK-FAC is not the block GGN, but its corrected eigenvalues estimate, without
    bias, the diagonal of each exact GGN block in the fitted Kronecker eigenbasis ``Q_S ⊗ Q_A`` (the correction pass
    draws fresh labels): on an MLP's two blocks, 8 examples, the error shrinks with ``fisher_samples``. Measured
    (seed 0; seeds 0-11 in brackets): relative error over both blocks 0.29 [0.17-0.89] at 1 draw per example,
    0.083 [0.053-0.145] at 16; ratio 16 / 1 <= 0.44."""
    train, _ = _data()
    model = _model("mlp")
    data = train.subset(list(range(8)))
    G = Reference(model).ggn(data.x.double())
    errors = {}
    for m in (1, 16):
        s = EKFAC(fisher_samples=m, seed=0, **F64)
        s.fit(model, data)
        M = _layout_to_params(s.layout, model)
        G_layout = M @ G @ M.T
        num = den = 0.0
        for i, b in enumerate(s.layout.blocks):
            Q = torch.kron(s.state[f"{i}.QS"], s.state[f"{i}.QA"])
            target = torch.diagonal(Q.T @ G_layout[b.slice, b.slice] @ Q).reshape(s.state[f"{i}.lambda"].shape)
            num += float((s.state[f"{i}.lambda"] - target).norm() ** 2)
            den += float(target.norm() ** 2)
        errors[m] = (num / den) ** 0.5
    assert errors[16] < 0.6 * errors[1] and errors[16] < 0.2, errors


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
    # auto: 0.1 x the mean of all corrected eigenvalues (trace(G) / P), one rule for every solver
    mean_eig = sum(float(s.state[f"{j}.lambda"].sum()) for j in range(len(s.layout.blocks))) / s.layout.size
    both = s.precondition_all(v, s.dampings)
    for k, d in enumerate(s.dampings):
        lam = 0.1 * mean_eig if d == "auto" else d
        for got in (s.precondition(v, d), both[k]):  # one damping at a time, and all in one call
            for i, b in enumerate(s.layout.blocks):
                M = _dense_kfac_block(s, i) + lam * torch.eye(b.size, dtype=torch.float64)
                torch.testing.assert_close(got[:, b.slice], torch.linalg.solve(M, v[:, b.slice].T).T)


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


def _fp32_and_bf16(setup, cls):
    """The CNN in float32 with a float32 and a bf16-autocast solver of ``cls``, fitted (EK-FAC) or set up."""
    model64, _, train, x, y, _ = setup["cnn"]
    model = copy.deepcopy(model64).float()
    full, amp = cls(damping=1e-2, batch_size=16), cls(damping=1e-2, batch_size=16, autocast="bf16")
    for s in (full, amp):
        s.fit(model, train) if cls is EKFAC else s.setup(model)
    return model, full, amp, x.float(), y


@pytest.mark.parametrize("cls", [EKFAC, Identity])
def test_bf16_autocast_gradients_and_scores_track_float32(setup, cls):
    """``solver.autocast=bf16`` runs the gradient passes in bfloat16 (results change at bf16 precision) while
    sums and inverses stay in float32/float64: self-influence keeps its ranking."""
    from scipy.stats import spearmanr

    model, full, amp, xf, y = _fp32_and_bf16(setup, cls)
    g, g_amp = full.train_grads(model, xf, y), amp.train_grads(model, xf, y)
    assert g.dtype == torch.float32 and g_amp.dtype == torch.bfloat16  # stored in bf16: half the memory
    assert float((g - g_amp.float()).norm() / g.norm()) < 0.05
    a, b = (s.self_influence(model, xf, y, [1e-2])[0] for s in (full, amp))
    assert b.dtype == torch.float32 and spearmanr(a.numpy(), b.numpy()).statistic > 0.98


@pytest.mark.parametrize("cls", [EKFAC, Identity])
def test_bf16_pairwise_keeps_queries_in_bf16_and_tracks_float32(setup, cls):
    """Under ``autocast=bf16`` the query gradients (written batch by batch into one matrix), their preconditioned
    copies and the prepared queries stay bf16 (half of float32's memory), the scores accumulate in float32 and rank
    the training points as the float32 pass does; the queries' own rows match float32's to bf16 precision."""
    from scipy.stats import spearmanr

    from influencelab.data.base import LabeledData
    from influencelab.scores import precondition_queries, query_gradients

    model, full, amp, xf, y = _fp32_and_bf16(setup, cls)
    xq, yq = xf[:12], y[:12]
    queries = LabeledData(xq, yq)
    pre = {}
    for name, s in (("full", full), ("amp", amp)):
        g = query_gradients(s, model, queries, batch_size=5)  # 3 batches, the last one short
        rows = torch.cat([s.train_grads(model, xq[i:i + 5], yq[i:i + 5]) for i in range(0, 12, 5)])
        assert g.dtype == s.store_dtype and torch.equal(g, rows)  # each batch's rows, in place
        pre[name] = precondition_queries(s, g, [1e-2], consume=True)
        assert pre[name].dtype == s.store_dtype and pre[name].data_ptr() == g.data_ptr()  # solved in place
    assert amp.store_dtype == torch.bfloat16 and full.store_dtype == torch.float32
    assert float((pre["full"] - pre["amp"].float()).norm() / pre["full"].norm()) < 0.1  # (factors fitted in bf16 too)
    a = full.pairwise(model, full.prepare_queries(pre["full"]), xf, y)
    b = amp.pairwise(model, amp.prepare_queries(pre["amp"]), xf, y)
    assert b.dtype == torch.float32 and b.shape == a.shape == (12, len(y))
    rho = [spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(12)]
    assert min(rho) > 0.95, rho


def test_autocast_config_errors():
    with pytest.raises(ConfigError, match="solver.autocast"):
        EKFAC(autocast="int8")
    with pytest.raises(ConfigError, match="solver.dtype=float32"):
        EKFAC(autocast="bf16", dtype="float64")

"""solver=arnoldi against dense float64 ground truth (torch.func GGN + torch.linalg.solve / eigh, built independently
in test_solvers.Reference): the top-k eigenpairs, the inverse on them for either complement, one fit for every
damping, the cache, and a CLI run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from influencelab.errors import ConfigError
from influencelab.solvers.arnoldi import Arnoldi
from influencelab.solvers.cg import CG
from test_solvers import Reference, _data, _model, _short_train, from_param_order

F64 = {"dtype": "float64", "batch_size": 16}


@pytest.fixture(scope="module")
def tiny():
    """A partly trained MLP (610 parameters) on 16 digits: its GGN has rank 137 (16 x 9 at most), eigenvalues
    0.23 down to 2e-12 and then rounding noise; the dense GGN in the solver's layout, descending eigenpairs and
    three query gradients."""
    train, test = _data(16)
    model = _short_train(_model("mlp"), train)
    ref = Reference(model)
    layout = Arnoldi(**F64).setup(model)
    G = ref.ggn(train.x.double())
    perm = from_param_order(layout, model, torch.eye(len(G), dtype=G.dtype))  # rows: unit vectors in layout order
    G = perm.T @ G @ perm
    e, V = torch.linalg.eigh(G)
    e, V = e.flip(0), V.flip(1)
    rank = int((e > 1e-14 * e[0]).sum())
    q = from_param_order(layout, model, ref.grads(test.x[:3].double(), test.targets[:3]))
    return model, train, G, e, V, rank, q


def _solve(G: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), v.T).T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _fit(model, train, **kwargs) -> Arnoldi:
    s = Arnoldi(**{**F64, **kwargs})
    s.fit(model, train)
    return s


def test_top_k_at_the_rank_of_g_equals_the_dense_solve_at_every_damping(tiny):
    """complement=damping with the whole range of G kept is (G + λI)^-1 itself, down to λ = 1e-6 (the Krylov
    subspace turns invariant after ~rank + 1 steps and the iteration restarts orthogonally)."""
    model, train, G, e, V, rank, q = tiny
    assert 100 < rank < len(G) and float(e[0]) > 0.1
    s = _fit(model, train, top_k=rank, n_iters=rank + 20, complement="damping", damping=1e-3)
    assert len(s.eigenvalues) == rank
    torch.testing.assert_close(s.eigenvalues, e[:rank], rtol=1e-9, atol=1e-14)
    for lam in (1.0, 1e-2, 1e-4, 1e-6):
        assert _rel(s.precondition(q, lam), _solve(G, q, lam)) <= 1e-8, lam


def test_error_falls_as_k_grows_and_each_k_is_the_dense_top_k_eigenspace_solve(tiny):
    """Per k: complement=drop equals the dense solve restricted to the top-k eigenspace of eigh(G),
    V_k diag(1/(e + λ)) V_k^T v, and complement=damping equals that plus (v - V_k V_k^T v)/λ; the error against the
    full solve falls strictly as k grows, for either complement (k = rank: the first test)."""
    model, train, G, e, V, rank, q = tiny
    lam = 1e-3
    exact = _solve(G, q, lam)
    errors = {"drop": [], "damping": []}
    for k in (5, 20, 80):  # (eigenvalue gaps at k: 1e-2, 4e-4, 5e-6, far above the noise)
        Vk = V[:, :k]
        restricted = ((q @ Vk) / (e[:k] + lam)) @ Vk.T
        expected = {"drop": restricted, "damping": restricted + (q - (q @ Vk) @ Vk.T) / lam}
        for complement in errors:
            s = _fit(model, train, top_k=k, n_iters=rank + 20, complement=complement)
            out = s.precondition(q, lam)
            assert _rel(out, expected[complement]) <= 1e-8, (k, complement)
            errors[complement].append(_rel(out, exact))
    for complement, errs in errors.items():
        assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), (complement, errs)
    assert errors["drop"][-1] > 0.1  # drop discards q's part in the null space of G, damping keeps it


def test_short_iteration_finds_the_top_eigenpairs_and_reports_their_residuals(tiny):
    """n_iters = 2k (the default) already resolves the top eigenvalues: each kept Ritz value lies within its
    reported residual of the dense one, and the reported residuals are the true ||G u - s u||."""
    model, train, G, e, V, rank, q = tiny
    s = _fit(model, train, top_k=10)
    assert s.n_iters == 20
    U, ev = s.eigenvectors, s.eigenvalues
    torch.testing.assert_close(U @ U.T, torch.eye(10, dtype=U.dtype), atol=1e-12, rtol=0)
    true_res = (U @ G - ev[:, None] * U).norm(dim=1)
    torch.testing.assert_close(s.ritz_residuals, true_res, atol=1e-13, rtol=1e-6)
    assert ((ev - e[:10]).abs() <= s.ritz_residuals + 1e-14).all()
    torch.testing.assert_close(ev[:5], e[:5], rtol=1e-9, atol=0)


def test_one_fit_serves_every_damping_and_the_cached_state_reproduces_it(tiny):
    """Fitting with a list of dampings gives, at each, what a separate fit at that damping gives; the fit key
    holds no damping (and is the same unfitted); a solver loaded from the state dict (not fitted) preconditions identically; the specialised
    self-influence equals g^T precondition(g)."""
    model, train, G, e, V, rank, q = tiny
    for complement in ("drop", "damping"):
        both = _fit(model, train, top_k=20, complement=complement, damping=[1e-1, 1e-3])
        out = both.precondition_all(q, both.dampings)
        for i, lam in enumerate((1e-1, 1e-3)):
            alone = _fit(model, train, top_k=20, complement=complement, damping=lam)
            assert alone.fit_config() == both.fit_config()
            torch.testing.assert_close(out[i], alone.precondition(q, lam), rtol=0, atol=0)
        loaded = Arnoldi(**F64, top_k=20, complement=complement, damping=[1e-1, 1e-3])
        loaded.setup(model)
        assert loaded.fit_config() == both.fit_config()  # the cache key is the same before and after fitting
        loaded.load_state_dict(both.state_dict())
        torch.testing.assert_close(loaded.precondition_all(q, loaded.dampings), out, rtol=0, atol=0)
        x, y = train.x[:5].double(), train.targets[:5]
        g = both.train_grads(model, x, y)
        generic = torch.stack([(both.precondition(g, d) * g).sum(1) for d in both.dampings])
        torch.testing.assert_close(both.self_influence(model, x, y, both.dampings), generic, rtol=1e-10, atol=0)


def test_auto_damping_is_the_trace_estimate_cg_uses(tiny):
    model, train, G, e, V, rank, q = tiny
    s = _fit(model, train, top_k=5, damping="auto")
    cg = CG(**F64, damping="auto")
    cg.fit(model, train)
    assert s.resolve_damping("auto") == cg.resolve_damping("auto")
    assert s.resolve_damping("auto") == pytest.approx(0.1 * float(G.trace()) / len(G), rel=0.3)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"top_k": 0}, "solver.top_k=0 is invalid"),
    ({"top_k": 10, "n_iters": 5}, "solver.n_iters=5 is invalid"),
    ({"complement": "zero"}, "solver.complement='zero' is invalid"),
    ({"complement": "damping", "damping": [0.0, 1.0]}, "solver.damping=0 is invalid.*complement=drop"),
])
def test_config_errors_are_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Arnoldi(**kwargs)


def test_cli_fit_and_self_influence_then_cached(run_pipeline):
    """solver=arnoldi through the pipeline on digits (train, fit, self at two dampings); a second run reuses the
    cached eigenpairs and gives the same scores."""
    args = ["dataset=digits", "dataset.subset=120", "model=mlp", "trainer.epochs=2", "solver=arnoldi",
            "solver.top_k=20", "solver.damping=[1e-2,1.0]", "stages=[train,fit,self]"]
    run_a, m_a = run_pipeline(args, "a")
    run_b, m_b = run_pipeline(args, "b")
    assert not m_a["fit/cached"] and m_b["fit/cached"]
    a = load_file(str(run_a / "scores" / "self.safetensors"))["scores_by_damping"]
    b = load_file(str(run_b / "scores" / "self.safetensors"))["scores_by_damping"]
    assert a.shape == (2, 120) and torch.isfinite(a).all() and (a >= 0).all()
    assert (a[0] >= a[1]).all()  # (s + λ)^-1 falls with λ
    torch.testing.assert_close(a, b, rtol=0, atol=0)

"""LiSSA tuned as its users tune it (issue 29 item 3) and its unconverged warning (issue 30 item 3), against dense
float64 ground truth built here with torch.func: ``scale=search`` picks, per damping, the smallest scale of
``scale_start x {1, 10, 100, ...}`` that does not diverge (the next smaller one does: checked, and against the exact
divergence threshold ``(λ_max(G) + λ) / 2`` of full-batch products); ``depth=auto`` runs ``ceil(n / repeats)`` steps;
the rule is recorded; the depth the warning suggests converges when applied, and the scale a divergence error
suggests does not diverge."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from influencelab import Attributor
from influencelab.engine import convergence_metrics
from influencelab.errors import ConfigError, SolverDivergedError
from influencelab.solvers.lissa import LiSSA
from test_convergence import _dense_ggn, _dense_residual, _tiny

N = 256


@pytest.fixture(scope="module")
def problem():
    """The tiny float64 MLP on ``N`` points, 3 query gradients, the dense GGN (parameter order) and its top
    eigenvalue (1.59)."""
    net, x, y = _tiny(N)
    attr = Attributor(net, solver=LiSSA(damping=1.0, depth=1, dtype="float64")).fit(TensorDataset(x, y))
    v = attr.query_gradients(TensorDataset(x[:3], y[:3]))
    G, names = _dense_ggn(attr.model, x)
    return net, x, y, v, G, names, float(torch.linalg.eigvalsh(G)[-1])


def _solve(problem, dampings, **kw):
    net, x, y, v, *_ = problem
    attr = Attributor(net, solver=LiSSA(damping=dampings, dtype="float64", **kw)).fit(TensorDataset(x, y))
    return attr, attr.precondition(v)


def _dense(problem, attr, out_row, lam):
    """The dense relative residual and the relative error against ``torch.linalg.solve`` of one damping's rows."""
    _, _, _, v, G, names, _ = problem
    res = _dense_residual(attr, G, names, v, out_row, lam)
    names_ = names

    def to_params(t):
        d = attr.solver.layout.unflatten(t, attr.model)
        return torch.cat([d[k].reshape(len(t), -1) for k in names_], 1)

    exact = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), to_params(v).T).T
    err = (to_params(out_row) - exact).norm(dim=1) / exact.norm(dim=1)
    return res, err


def test_search_and_auto_depth_converge_to_the_dense_solve_at_several_dampings(problem):
    """scale=search, depth=auto, 4 repeats (64 steps of 64 points, each repeat its own stream) at three dampings:
    converged, and the dense residual and error against the dense solve are within the tolerance; the held-out set
    is the whole training set here (min(8 x 64, N) = N), so the recorded residual is the dense one."""
    dampings = [0.5, 1.0, 3.0]
    attr, out = _solve(problem, dampings, scale="search", depth="auto", repeats=4, batch_size=64)
    for i, lam in enumerate(dampings):
        c = attr.diagnostics[lam]
        res, err = _dense(problem, attr, out[i], lam)
        assert c.iterations == math.ceil(N / 4) == 64 and c.repeats == 4
        assert c.converged and res.max() <= c.tol == 0.1 and err.max() <= 0.1, (lam, res, err)
        torch.testing.assert_close(torch.tensor(c.rel_residual_max, dtype=res.dtype), res.max(), rtol=1e-6, atol=0)
        assert "scale=search: tried" in c.rule and f"chose {c.scale:g}" in c.rule
        assert "depth=auto: ceil(n / repeats) = ceil(256 / 4) = 64, 4 repeats averaged" in c.rule
    # the rule beside the result, per damping, in the metrics the CLI logs
    m = convergence_metrics(attr.diagnostics)
    assert m["solver/repeats@3"] == 4 and m["solver/iterations@3"] == 64 and m["solver/scale@3"] == 10.0
    assert m["solver/rule@0.5"].startswith("scale=search: tried 1 (diverged at step")


@pytest.mark.parametrize("lam", [0.01, 3.0, 30.0])
def test_search_chooses_the_smallest_scale_that_does_not_diverge(problem, lam):
    """Full-batch products: the recursion diverges exactly when s < (λ_max(G) + λ) / 2. The scale chosen is the
    first grid point above that threshold (grid 0.01 x 10^k), and the scale before it, fixed, diverges."""
    lam_max = problem[-1]
    threshold = (lam_max + lam) / 2
    attr, _ = _solve(problem, lam, scale="search", scale_start=0.01, depth=20, batch_size=N)
    c = attr.diagnostics[lam]
    grid = attr.solver.scale_grid()
    expected = min(s for s in grid if s > threshold)
    assert c.scale == pytest.approx(expected) and c.scale / 10 < threshold
    tried = [f"{s:g}" for s in grid if s <= expected]
    assert c.rule.startswith(f"scale=search: tried {tried[0]} (diverged")
    assert f", {tried[-1]}; chose {tried[-1]}" in c.rule and c.rule.count("diverged at step") == len(tried) - 1
    with pytest.raises(SolverDivergedError, match="diverged"):
        _solve(problem, lam, scale=c.scale / 10, depth=20, batch_size=N)


def test_each_damping_searches_its_own_scale_in_one_joint_solve(problem):
    """Dampings solved together get their own scales (1, 10, 100 at λ = 0.01, 3, 30), and each result equals a
    separate solve at that damping (the same recursion, the others dropping out when they diverge)."""
    dampings = [0.01, 3.0, 30.0]
    attr, out = _solve(problem, dampings, scale="search", depth=20, batch_size=N)
    assert [attr.diagnostics[d].scale for d in dampings] == [1.0, 10.0, 100.0]
    for i, lam in enumerate(dampings):
        _, alone = _solve(problem, lam, scale="search", depth=20, batch_size=N)
        torch.testing.assert_close(out[i], alone[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_size", [N, 64])
def test_the_suggested_depth_converges_when_applied(problem, batch_size, caplog):
    """Too shallow at λ = 0.02: unconverged, and the warning names a depth estimated from the residuals at half and
    full depth; rerun with it, the solve is converged (and the dense residual agrees). With full-batch products the
    depth needed is known exactly -- the residual after J steps is ``(I - (G + λI)/s)^(J+1) v`` -- and the
    suggestion lies between it and 3x it (the 1.5x margin on an extrapolated rate)."""
    lam = 0.02
    with caplog.at_level(logging.WARNING, logger="influencelab"):
        attr, _ = _solve(problem, lam, depth=40, batch_size=batch_size)
        attr.pairwise(TensorDataset(problem[1][:2], problem[2][:2]))
    c = attr.diagnostics[lam]
    assert not c.converged and set(c.suggest) == {"depth"} and c.suggest["depth"] > 40
    assert f"set depth={c.suggest['depth']}" in caplog.text and "now depth=40" in caplog.text
    assert "contraction" in c.rule and "unconverged: worst residual" in c.rule
    if batch_size == N:
        _, _, _, v, G, names, _ = problem
        d = attr.solver.layout.unflatten(v, attr.model)
        r = torch.cat([d[k].reshape(len(v), -1) for k in names], 1).T
        B = torch.eye(len(G), dtype=G.dtype) - (G + lam * torch.eye(len(G), dtype=G.dtype)) / c.scale
        v_norm, needed = r.norm(dim=0), 0
        while ((r := B @ r).norm(dim=0) / v_norm).max() > 0.1:
            needed += 1
        assert needed <= c.suggest["depth"] <= 3 * needed, (needed, c.suggest)
    attr2, out = _solve(problem, lam, depth=c.suggest["depth"], batch_size=batch_size)
    c2 = attr2.diagnostics[lam]
    res, _ = _dense(problem, attr2, out[0], lam)
    assert c2.converged and res.max() <= 0.1 and c2.suggest is None


@pytest.mark.slow
def test_a_stalled_recursion_suggests_more_repeats_which_lower_the_residual(problem):
    """Mini-batch noise: at λ = 0.3 with 2 repeats of depth=auto the residual stops falling between half and full
    depth; the suggestion is more repeats at the same depth, and applied, the residual falls (0.39 -> 0.20 here;
    not to the tolerance: part of the stall was slow contraction hidden by the noise -- a known limit of the
    estimate, see LiSSA._suggest)."""
    lam = 0.3
    attr, _ = _solve(problem, lam, scale="search", depth="auto", repeats=2, batch_size=64)
    c = attr.diagnostics[lam]
    assert not c.converged and set(c.suggest) == {"repeats", "depth"} and c.suggest["depth"] == 128
    assert "stalled" in c.rule
    attr2, out = _solve(problem, lam, scale="search", **c.suggest, batch_size=64)
    res, _ = _dense(problem, attr2, out[0], lam)
    assert attr2.diagnostics[lam].rel_residual_max <= 0.6 * c.rel_residual_max and res.max() <= 0.6 * c.rel_residual_max


def test_a_divergence_names_a_scale_that_does_not_diverge(problem):
    """A fixed scale 5x below the threshold diverges; the error names a scale from the measured norm growth, and
    that scale does not diverge."""
    lam = 0.1
    threshold = (problem[-1] + lam) / 2
    with pytest.raises(SolverDivergedError, match=r"solver.scale \(e.g. ([\d.e+-]+)\)") as e:
        _solve(problem, lam, scale=threshold / 5, depth=40, batch_size=N)
    import re

    need = float(re.search(r"solver.scale \(e.g. ([\d.e+-]+)\)", str(e.value)).group(1))
    assert threshold < need < 10 * threshold
    attr, _ = _solve(problem, lam, scale=need, depth=40, batch_size=N)
    assert attr.diagnostics[lam].scale == need


def test_bad_tuning_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="solver.scale='find' is invalid"):
        LiSSA(scale="find")
    with pytest.raises(ConfigError, match="solver.depth='deep' is invalid"):
        LiSSA(depth="deep")
    with pytest.raises(ConfigError, match="solver.scale_start=0 is invalid"):
        LiSSA(scale="search", scale_start=0)


def test_the_held_out_noise_estimate_is_what_the_exact_solution_shows():
    """With a held-out sample smaller than the training set, even the exact solution has a held-out residual: the
    sample's own noise ``||(G_H - G) x*|| / ||v||``. The estimate from the sample's two halves (recorded as the
    floor) matches what the dense exact solution shows on that sample to within 2x, and a solve stuck there is told
    to enlarge the held-out set (batch_size), not to run longer."""
    net, x, y = _tiny(1024)
    lam = 0.01
    solver = LiSSA(damping=lam, depth=20, batch_size=8, dtype="float64")
    attr = Attributor(net, solver=solver).fit(TensorDataset(x, y))
    v = attr.query_gradients(TensorDataset(x[:6], y[:6]))
    G, names = _dense_ggn(attr.model, x)

    def to_params(t):
        d = solver.layout.unflatten(t, attr.model)
        return torch.cat([d[k].reshape(len(t), -1) for k in names], 1)

    sizes = [p.numel() for _, p in attr.model.named_parameters()]
    exact_p = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), to_params(v).T).T
    parts = {k: u.reshape(len(v), *p.shape) for (k, p), u in zip(attr.model.named_parameters(),
                                                                 exact_p.split(sizes, 1), strict=True)}
    exact = solver.layout.flatten(parts)
    idx, _ = solver.held_out(torch.ones(len(x), dtype=torch.bool))
    rel, noise = solver._residuals(exact, v, torch.full((len(v), 1), lam, dtype=v.dtype), solver._data.subset(idx))
    assert rel.max() > 0.1  # the exact solution itself "fails" the 10% check on 64 of 1024 points
    assert 0.5 <= float(noise.max() / rel.max()) <= 2, (noise, rel)
    # a long enough recursion stalls at that noise: the suggestion is a larger held-out set
    attr2 = Attributor(net, solver=LiSSA(damping=lam, depth=300, batch_size=8, dtype="float64",
                                         check_examples=64)).fit(
        TensorDataset(x, y))
    attr2.precondition(v)
    c = attr2.diagnostics[lam]
    assert not c.converged and c.floor > 0.5 * c.rel_residual_max
    assert c.suggest["check_examples"] > 64 and "held-out sample's own noise" in c.rule


def test_repeats_are_traced_after_each_repeat_with_their_running_average(problem):
    """With ``repeats > 1`` the per-iteration monitor (the ihvp stage's error trace, the time-matched comparison's
    input) is called after each repeat with the average of the repeats done, at the steps taken in all: the last
    call is the returned solution, the first one a single repeat's (different: the repeats' streams differ)."""
    net, x, y, v, *_ = problem
    dampings = [1.0, 3.0]
    solver = LiSSA(damping=dampings, dtype="float64", scale=10.0, depth=20, repeats=3, batch_size=32)
    attr = Attributor(net, solver=solver).fit(TensorDataset(x, y))
    seen: list[tuple[float, int, torch.Tensor]] = []
    attr.members[0].solver.set_monitor(lambda d, it, sol: seen.append((d, it, sol.clone())))
    out = attr.precondition(v)
    for i, lam in enumerate(dampings):
        calls = [(it, sol) for d, it, sol in seen if d == lam]
        assert [it for it, _ in calls] == [20, 40, 60]
        torch.testing.assert_close(calls[-1][1], out[i], rtol=1e-12, atol=0)
        assert float((calls[0][1] - out[i]).norm()) > 1e-6 * float(out[i].norm())

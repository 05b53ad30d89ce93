"""EK-FAC/K-FAC-preconditioned CG and LiSSA (``solver.preconditioner``) against dense float64 solves of the damped
system, the preconditioner's cached fit reused, and the CLI path."""

# ruff: noqa: F811  (the tests take test_solvers' imported module fixture ``setup`` as an argument)
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from influencelab.api import Attributor
from influencelab.errors import ConfigError, SolverDivergedError
from influencelab.solvers.cg import CG
from influencelab.solvers.ekfac import EKFAC, KFAC
from influencelab.solvers.exact import Exact
from influencelab.solvers.lissa import LiSSA
from test_solvers import F64, from_param_order, setup, to_param_order  # noqa: F401 (setup: the shared module fixture)


def _dense_solve(ref, curvature, x, y, gq, lam):
    G = ref.dense(curvature, x, y)
    return torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), gq.T).T


def _fitted(cls, model, train, curvature, lam, **kw):
    s = cls(damping=lam, curvature=curvature, **F64, **kw)
    s.fit(model, train)
    return s


def _rel(a, b):
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("curvature", ["fisher", "empirical_fisher", "hessian"])
def test_preconditioned_cg_equals_the_dense_solve(setup, kind, curvature):
    """The solution is the damped system's whatever the preconditioner (EK-FAC estimates the Gauss-Newton part of
    a Hessian solve, the true Fisher there); CG's own iteration count and true residual are recorded."""
    model, ref, train, x, y, gq = setup[kind]
    lam = 0.5 if curvature == "hessian" else 1e-2
    expected = _dense_solve(ref, curvature, x, y, gq, lam)
    pre = _fitted(EKFAC, model, train, "fisher" if curvature == "hessian" else curvature, lam)
    cg = _fitted(CG, model, train, curvature, lam, tol=1e-10, max_iter=3000, batch_size=16, preconditioner=pre)
    got = to_param_order(cg.layout, model, cg.precondition(from_param_order(cg.layout, model, gq), lam))
    assert _rel(got, expected) <= 1e-6
    conv = cg.diagnostics()[lam]
    assert conv.converged and conv.rel_residual_max <= 1e-9 and conv.preconditioner == "ekfac"
    assert conv.iterations >= 2 and conv.solve_s > 0
    assert cg.label == "cg+ekfac"


def test_preconditioned_cg_with_kfac_equals_the_dense_solve(setup):
    model, ref, train, x, y, gq = setup["mlp"]
    lam = 1e-2
    expected = _dense_solve(ref, "fisher", x, y, gq, lam)
    pre = _fitted(KFAC, model, train, "fisher", lam)
    cg = _fitted(CG, model, train, "fisher", lam, tol=1e-10, max_iter=3000, preconditioner=pre)
    got = to_param_order(cg.layout, model, cg.precondition(from_param_order(cg.layout, model, gq), lam))
    assert _rel(got, expected) <= 1e-6 and cg.label == "cg+kfac"


def test_cg_preconditioned_by_the_exact_inverse_converges_in_one_iteration(setup):
    """With P = G + λI itself, PCG's first step is the solution: the recursion applies P^-1 where it should
    (a PCG that preconditioned the wrong vector, or not at all, would need dozens of iterations here)."""
    model, ref, train, x, y, gq = setup["cnn"]
    lam = 1e-3
    exact = _fitted(Exact, model, train, "fisher", lam)
    plain = _fitted(CG, model, train, "fisher", lam, tol=1e-10, max_iter=2000)
    pcg = _fitted(CG, model, train, "fisher", lam, tol=1e-10, max_iter=2000, preconditioner=exact)
    v = from_param_order(plain.layout, model, gq)
    a, b = pcg.precondition(v, lam), plain.precondition(v, lam)
    assert _rel(a, b) <= 1e-6
    assert pcg.diagnostics()[lam].iterations == 1 and plain.diagnostics()[lam].iterations >= 20


def test_preconditioner_damping_changes_iterations_not_the_solution(setup):
    model, ref, train, x, y, gq = setup["mlp"]
    lam = 1e-2
    expected = _dense_solve(ref, "fisher", x, y, gq, lam)
    pre = _fitted(EKFAC, model, train, "fisher", lam)
    for lp in ("same", 0.3):
        cg = _fitted(CG, model, train, "fisher", lam, tol=1e-10, max_iter=3000, preconditioner=pre,
                     preconditioner_damping=lp)
        got = to_param_order(cg.layout, model, cg.precondition(from_param_order(cg.layout, model, gq), lam))
        assert _rel(got, expected) <= 1e-6


@pytest.mark.parametrize("kind,lam", [("mlp", 0.2), pytest.param("cnn", 1.0, marks=pytest.mark.slow)])
def test_preconditioned_lissa_is_within_2_percent_at_enough_depth(setup, kind, lam):
    """Full-batch products isolate the recursion from sampling noise. The step 1/s comes from the power iteration
    on P^-1 (G + λI) (scale=auto): s must cover its top eigenvalue (stable), and the error then contracts by
    (1 - μ_min / s) a step, so J = 8 s / μ_min steps (μ_min from the dense spectrum) leave < 2%. The result is the
    damped system's, not the preconditioner's. (The CNN needs ~1,800 full-batch steps: marked slow.)"""
    model, ref, train, x, y, gq = setup[kind]
    expected = _dense_solve(ref, "fisher", x, y, gq, lam)
    ex = _fitted(Exact, model, train, "fisher", lam)
    pre = _fitted(EKFAC, model, train, "fisher", lam)
    li = _fitted(LiSSA, model, train, "fisher", lam, depth=1, batch_size=len(train), preconditioner=pre)
    st = ex.state_dict()
    eye = torch.eye(len(st["evals"]), dtype=torch.float64)
    A = st["evecs"] @ torch.diag(st["evals"] + lam) @ st["evecs"].T
    mu = torch.linalg.eigvals(pre.precondition(eye, lam) @ A).real
    s = li._scales([lam]).item()
    assert mu.max() <= s <= 2.5 * mu.max()
    li.depth = int(8 * s / mu.min()) + 1
    assert li.depth < 5000
    v = from_param_order(li.layout, model, gq)
    got = to_param_order(li.layout, model, li.precondition(v, lam))
    assert _rel(got, expected) <= 0.02
    assert _rel(to_param_order(li.layout, model, pre.precondition(v, lam)), expected) > 0.05  # P alone is not it
    conv = li.diagnostics()[lam]
    assert conv.preconditioner == "ekfac" and conv.scale == pytest.approx(s)


def test_preconditioned_lissa_joint_dampings_equal_separate_runs(setup):
    model, ref, train, x, y, gq = setup["mlp"]
    pre = _fitted(EKFAC, model, train, "fisher", [0.2, 1.0])
    li = _fitted(LiSSA, model, train, "fisher", [0.2, 1.0], depth=50, batch_size=len(train), preconditioner=pre)
    v = from_param_order(li.layout, model, gq)
    both = li.precondition_all(v, [0.2, 1.0])
    for i, lam in enumerate((0.2, 1.0)):
        torch.testing.assert_close(both[i], li.precondition(v, lam), rtol=1e-9, atol=1e-12)



def test_preconditioned_lissa_divergence_is_reported_with_a_larger_scale_suggested(setup):
    """A fixed scale far below the top eigenvalue of P^-1 (G + λI) makes the preconditioned recursion grow; it
    stops with the solver named and a larger scale suggested, as plain LiSSA does. With scale=auto (from the
    power iteration) the same solve converges."""
    model, ref, train, x, y, gq = setup["mlp"]
    pre = _fitted(EKFAC, model, train, "fisher", 1e-3)
    li = _fitted(LiSSA, model, train, "fisher", 1e-3, depth=200, batch_size=16, scale=1e-3, preconditioner=pre)
    v = from_param_order(li.layout, model, gq)
    with pytest.raises(SolverDivergedError, match=r"preconditioned by ekfac.*larger solver.scale"):
        li.precondition(v, 1e-3)
    ok = _fitted(LiSSA, model, train, "fisher", 1e-3, depth=20, batch_size=16, preconditioner=pre)
    assert torch.isfinite(ok.precondition(v, 1e-3)).all()

def test_preconditioner_is_fitted_once_and_reused_from_an_ekfac_run(setup, tmp_path):
    """Through the API with a cache: the preconditioner's fit key is a ``solver=ekfac`` run's of the same model,
    so a preconditioned solve after an EK-FAC run loads its factors instead of refitting."""
    model, ref, train, x, y, gq = setup["mlp"]
    kw = dict(damping=1e-2, cache_dir=tmp_path, modules="all", dtype="float64")
    ek = Attributor(model, solver="ekfac", **kw).fit(train)
    assert not ek.fit_info.cached
    pcg = Attributor(model, solver="cg", preconditioner="ekfac", tol=1e-10, max_iter=2000, **kw).fit(train)
    sub = pcg.solver.preconditioner
    assert pcg.artifacts.fit_key(sub, pcg.model_key) == ek.fit_key
    for name, t in ek.solver.state_dict().items():  # loaded, equal to the EK-FAC run's factors
        torch.testing.assert_close(sub.state_dict()[name], t, rtol=0, atol=0)
    # the preconditioned key differs from plain CG's (a plain run's cache entries are not taken for it)
    plain = Attributor(model, solver="cg", **kw)
    assert plain.solver.fit_config() != pcg.solver.fit_config()
    v = from_param_order(pcg.solver.layout, model, gq)
    a = pcg.precondition(v)[0]
    b = Attributor(model, solver="exact", **kw).fit(train).precondition(v)[0]
    assert _rel(a, b) <= 1e-6 and pcg.diagnostics[1e-2].preconditioner == "ekfac"


def test_bad_preconditioner_is_one_line_error():
    with pytest.raises(ConfigError, match="solver.preconditioner.*ekfac, kfac"):
        CG(damping=1e-2, preconditioner="lissa")
    with pytest.raises(ConfigError, match="solver.preconditioner_damping"):
        LiSSA(damping=1e-2, preconditioner="ekfac", preconditioner_damping=-1)


def test_cli_preconditioned_cg_records_iterations_in_metrics_and_score_file(run_pipeline):
    """``solver=cg solver.preconditioner=ekfac`` from the CLI: self-influence converges, the score file says which
    solver and how converged, the metrics carry iterations and solve time per damping."""
    run_dir, m = run_pipeline(["dataset=digits", "dataset.subset=120", "model=mlp", "trainer.epochs=2", "solver=cg",
                        "solver.preconditioner=ekfac", "solver.damping=1e-2", "solver.tol=1e-4",
                        "solver.max_iter=200", "stages=[train,fit,self]"])
    assert m["solver/converged@0.01"] and m["solver/iterations@0.01"] >= 1 and m["solver/solve_s@0.01"] > 0
    with safe_open(str(run_dir / "scores" / "self.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["solver"] == "cg+ekfac"
    conv = json.loads(meta["convergence"])["0.01"]
    assert conv["preconditioner"] == "ekfac" and conv["converged"] and conv["rel_residual_max"] <= 1e-4


def test_ihvp_stage_records_iterations_and_time_to_each_error_level(run_pipeline):
    """The ihvp stage traces the iterate's error against the reference every iteration: the first iteration at
    which it is <= 0.1 comes no later than the one for 0.01, both within the iterations run; the row is labelled
    with the preconditioner."""
    run_dir, m = run_pipeline(["experiment=ihvp", "dataset=digits", "model=mlp", "dataset.subset=100",
                               "trainer.epochs=1", "solver=cg", "solver.preconditioner=ekfac", "solver.tol=1e-8",
                               "solver.dtype=float64", "solver.damping=1e-2", "query.n=2",
                               "ihvp.reference_args.max_examples=100"])
    assert m["ihvp/solver"] == "cg+ekfac" and m["ihvp/rel_error"] <= 1e-4
    assert 1 <= m["ihvp/iters_to_0.1"] <= m["ihvp/iters_to_0.01"] <= m["ihvp/iterations"]
    assert 0 < m["ihvp/time_s_to_0.1"] <= m["ihvp/time_s_to_0.01"] <= m["ihvp/time_s"]


def test_unlearn_step_with_preconditioned_cg_equals_plain_cg_and_reports_convergence(run_pipeline):
    """The one-step removal with cg+ekfac is the same Newton step as plain CG's (same damped system), and the stage
    records how converged the step is."""
    base = ["experiment=unlearn", "dataset.subset=200", "trainer.epochs=3", "unlearn.mode=remove",
            "unlearn.selection=random", "unlearn.size=5", "solver=cg", "solver.damping=1e-2", "solver.tol=1e-6",
            "solver.dtype=float64", "solver.max_iter=1000"]
    _, plain = run_pipeline([*base, "solver.preconditioner=null"], name="plain")
    _, pre = run_pipeline([*base, "solver.preconditioner=ekfac"], name="pre")
    for m in (plain, pre):
        assert m["solver/converged@0.01"] is True and m["solver/rel_residual_max@0.01"] <= 1e-6
    assert pre["unlearn/edited/param_dist_rel"] == pytest.approx(plain["unlearn/edited/param_dist_rel"], rel=1e-4)
    assert pre["unlearn/edited/test_loss"] == pytest.approx(plain["unlearn/edited/test_loss"], rel=1e-4)

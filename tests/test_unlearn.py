"""Unlearning by one Newton step: second-order accuracy on a convex model, and the stage end to end."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from influencelab.data.digits import Digits
from influencelab.models import linear
from influencelab.solvers.exact import Exact
from influencelab.unlearn import grad_sum, newton_edit, repair_step

L2 = 1e-2


def _fit(model, x, y, w=None):
    """Minimise (1/n) sum_i w_i CE_i + L2/2 |θ|^2 to high precision (float64 L-BFGS)."""
    w = torch.ones(len(y), dtype=torch.float64) if w is None else w
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (w * F.cross_entropy(model(x), y, reduction="none")).sum() / len(y)
        loss = loss + L2 / 2 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return model


def _theta(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def convex():
    train, _ = Digits(subset=120, seed=0).load()
    x, y = train.x.double(), train.targets
    torch.manual_seed(0)
    model = _fit(linear(10, 1, 8).double(), x, y)
    solver = Exact(damping=L2, curvature="hessian", dtype="float64", batch_size=40)
    solver.fit(model, train)  # H = mean data Hessian; (H + L2 I) is the objective's exact Hessian
    return model, solver, train, x, y


def test_removal_step_is_second_order_accurate(convex):
    """Removing weight ε of one point: |one step - retrained optimum| = O(ε²) (halving ε quarters the error)."""
    model, solver, train, x, y = convex
    n, z = len(y), 7
    errors = []
    for eps in (0.4, 0.2, 0.1, 0.05):
        w = torch.ones(n, dtype=torch.float64)
        w[z] -= eps
        retrained = linear(10, 1, 8).double()
        retrained.load_state_dict(model.state_dict())
        _fit(retrained, x, y, w)
        edited = newton_edit(solver, model, eps * grad_sum(solver, model, x[z:z + 1], y[z:z + 1]), n, L2)
        errors.append(float((_theta(edited) - _theta(retrained)).norm()))
        # and the step does most of the work: far closer than not editing at all
        assert errors[-1] < 0.25 * float((_theta(model) - _theta(retrained)).norm())
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    assert all(3.0 < r < 5.0 for r in ratios), (errors, ratios)


def test_label_repair_moves_toward_the_retrained_optimum(convex):
    model, solver, train, x, y = convex
    n = len(y)
    idx = torch.tensor([3, 11, 40])
    wrong = (y[idx] + 3) % 10
    y_noisy = y.clone()
    y_noisy[idx] = wrong
    noisy = linear(10, 1, 8).double()
    noisy.load_state_dict(model.state_dict())
    _fit(noisy, x, y_noisy)
    s = Exact(damping=L2, curvature="hessian", dtype="float64", batch_size=40)
    from influencelab.data.base import LabeledData

    s.fit(noisy, LabeledData(train.x, y_noisy, y, train.indices, 10))
    edited = repair_step(s, noisy, x[idx], wrong, y[idx], n, L2)
    before = float((_theta(noisy) - _theta(model)).norm())
    after = float((_theta(edited) - _theta(model)).norm())
    assert after < 0.75 * before, (before, after)  # a large perturbation: one step goes a good part of the way
    with torch.no_grad():
        assert (edited(x[idx]).argmax(1) == y[idx]).all()


@pytest.mark.parametrize("mode, selection", [("remove", "random"), ("repair", "flipped")])
def test_unlearn_stage_end_to_end(run_pipeline, mode, selection):
    run_dir, m = run_pipeline(["experiment=unlearn", "dataset.subset=200", "trainer.epochs=3",
                               f"unlearn.mode={mode}", f"unlearn.selection={selection}", "unlearn.size=5"])
    assert m["unlearn/n_points"] == 5
    for name in ("original", "edited", "finetuned", "retrained"):
        assert 0 <= m[f"unlearn/{name}/test_accuracy"] <= 1
    for key in ("agreement", "kl_to_retrained", "param_dist_rel"):
        assert f"unlearn/edited/{key}" in m
    assert (run_dir / "figures" / "unlearn.png").exists()


def test_clean_pipeline_preset(run_pipeline):
    _, m = run_pipeline(["experiment=clean_pipeline", "dataset.subset=200", "trainer.epochs=3", "unlearn.size=20"])
    assert m["unlearn/n_points"] == m["unlearn/n_flipped_in_set"] >= 1  # repair keeps the flipped among the top 20


def test_report_plots_a_removal_size_sweep(tmp_path):
    r = run_cli(["-m", "experiment=unlearn", "dataset.subset=200", "trainer.epochs=3", "unlearn.size=2,5",
                 "logger=none"], tmp_path)
    assert r.returncode == 0, r.stderr
    (sweep,) = list((tmp_path / "multirun").glob("*/*"))
    from influencelab.report import report

    _, csv_path, figs = report(sweep)
    with open(csv_path) as f:
        assert sorted(float(row["unlearn/n_points"]) for row in csv.DictReader(f)) == [2, 5]
    assert [p.name for p in figs] == ["unlearn.png"] and figs[0].stat().st_size > 10_000

"""solver=gram (Woodbury on the n C x n C Gram matrix) against dense float64 solves built independently with
torch.func (test_solvers.Reference), down to λ = 1e-8; its block-diagonal variant, its streamed (recomputed-rows)
path and its recorded residuals."""
# ruff: noqa: F811  (the tests take test_solvers' imported module fixture ``setup`` as an argument)

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from influencelab.errors import ConfigError
from influencelab.solvers import gram as gram_module
from influencelab.solvers.gram import Gram, _Factors
from influencelab.solvers.layout import ParamLayout
from test_solvers import F64, from_param_order, setup, to_param_order  # noqa: F401, F811 (setup: the shared fixture)

DAMPINGS = [1e-8, 1e-6, 1e-4, 1e-2, 1.0]


def _fit(model, train, **kw):
    solver = Gram(**{**F64, "batch_size": 16, **kw})
    solver.fit(model, train)
    return solver


def _dense_solve(G: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), v.T).T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("curvature", ["fisher", "empirical_fisher"])
def test_gram_equals_dense_solve_at_every_damping(setup, kind, curvature):
    model, ref, train, x, y, qg = setup[kind]
    solver = _fit(model, train, curvature=curvature)
    G = ref.dense(curvature, x, y)
    v = from_param_order(solver.layout, model, qg)
    out = solver.precondition_all(v, DAMPINGS)  # one A v pass for all five
    for lam, got in zip(DAMPINGS, out, strict=True):
        want = _dense_solve(G, qg, lam)
        # the dense solve itself loses ~cond x eps: at λ = 1e-8 the condition number is ~1e8-1e9
        assert _rel(to_param_order(solver.layout, model, got), want) < (1e-5 if lam < 1e-5 else 1e-9), lam
    # every solve measured with jvp/vjp products (not the rows) and recorded
    diag = solver.diagnostics()
    assert set(diag) == set(DAMPINGS)
    assert all(c.n_vectors == len(qg) for c in diag.values())
    # with iterative refinement (solver.refine, default 2) the residual is at most 1e-6 at every damping, 1e-8
    # included, where float64's floor left it at ~1e-4 without (test_gram_refinement_below_the_rounding_floor)
    assert all(c.converged and c.rel_residual_max <= 1e-6 for c in diag.values())
    # trace(G) / P exactly, for damping=auto
    assert solver.mean_eigenvalue() == pytest.approx(float(torch.trace(G)) / len(G), rel=1e-10)
    # a training gradient lies in the row space of A: its self-influence (no null-space part) is right too
    g = solver.train_grads(model, x[:4], y[:4])
    si = solver.self_influence(model, x[:4], y[:4], [1e-6, 1e-2])
    gp = to_param_order(solver.layout, model, g)
    for j, lam in enumerate([1e-6, 1e-2]):
        want = (_dense_solve(G, gp, lam) * gp).sum(1)
        assert torch.allclose(si[j], want, rtol=1e-6), lam


def test_gram_refinement_below_the_rounding_floor(setup):
    """At λ = 1e-8 and 1e-10 one solve's residual is the rounding of A^T w times 1 / λ (1e-4 and 5e-2 on the tiny
    CNN); refinement steps with residuals measured through the network take it below 1e-6, the steps are recorded,
    and the refined solve still agrees with the dense one."""
    model, ref, train, x, y, qg = setup["cnn"]
    G = ref.dense("fisher", x, y)
    lams = [1e-10, 1e-8]
    worst = {}
    for refine in (0, 2):
        solver = _fit(model, train, refine=refine)
        out = solver.precondition_all(from_param_order(solver.layout, model, qg), lams)
        diag = solver.diagnostics()
        worst[refine] = [diag[lam].rel_residual_max for lam in lams]
        assert [diag[lam].iterations > 0 for lam in lams] == [refine > 0] * 2
        got = to_param_order(solver.layout, model, out[1])
        assert _rel(got, _dense_solve(G, qg, 1e-8)) < 1e-5
    assert min(worst[0]) > 1e-5  # the floor without refinement
    assert max(worst[2]) <= 1e-6  # and below the tolerance with it


def test_gram_row_paths_agree(setup):
    """torch.func rows, kept or streamed (keep_gb=0, outer blocks of 5 examples held while the later ones are
    recomputed), and the hooks' per-layer factors: the same Gram and the same solves."""
    model, ref, train, x, y, qg = setup["cnn"]
    kept = _fit(model, train, capture=False)
    per_example = 10 * kept.layout.size * 8 / 2**30
    streamed = _fit(model, train, capture=False, keep_gb=0, block_gb=per_example * 5.5)  # outer blocks of 5
    assert streamed._rows_kept is None and streamed._examples_per_block() == 5
    for (s1, _), (s2, _) in zip(kept._eig, streamed._eig, strict=True):
        assert torch.allclose(s1, s2, rtol=1e-10, atol=1e-12)
    v = from_param_order(kept.layout, model, qg)
    assert _rel(streamed.precondition(v, 1e-4), kept.precondition(v, 1e-4)) < 1e-9
    factored = _fit(model, train)  # (the default: hooks, each layer direct or factored by cost)
    assert factored._factors is not None and set(factored._factors.kind.values()) == {"direct", "factored"}
    assert torch.allclose(factored._eig[0][0], kept._eig[0][0], rtol=1e-9, atol=1e-10)
    assert _rel(factored.precondition(v, 1e-4), kept.precondition(v, 1e-4)) < 1e-9


def test_gram_factored_block_by_position_pairs_and_by_streamed_rows(setup, monkeypatch):
    """A factored block's Gram both ways, summed over position pairs and from rows formed a few examples at a time
    (blocks of 5, the last one shorter), equals the block's part of ``R R^T`` with the rows from torch.func; and
    the cost model streams ResNet-18's layer1 at 1,024 points (49 positions, rows of 3 GB) and sums layer3's
    4 positions pairwise."""
    model, ref, train, x, y, qg = setup["cnn"]
    rows = _fit(model, train, capture=False)._rows_kept
    f = _fit(model, train)._factors
    blocks = [b for b in f.layout.blocks if f.kind[b.name] == "factored"]
    assert blocks and rows is not None
    for b in blocks:
        monkeypatch.setattr(gram_module, "STREAM_BYTES", 2 * f.c * b.size * 8 * 5)
        assert f._stream_examples(b.size) == 5 and f.n % 5 != 0
        a, s = f.parts[b.name + ".a"], f.parts[b.name + ".s"]
        want = rows[:, b.slice] @ rows[:, b.slice].T
        for got in (f._gram_pairs(a, s), f._gram_streamed(a, s, b.size)):
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
    monkeypatch.undo()
    big = _Factors(None, 1024, 10)
    layer1, layer3 = (SimpleNamespace(out_dim=o, in_dim=i, size=o * i) for o, i in ((64, 576), (256, 2304)))
    assert big.choose(layer1, 49) == "factored" and big.streamed_cost(layer1, 49) < big.factored_cost(layer1, 49)
    assert big.choose(layer3, 4) == "factored" and big.streamed_cost(layer3, 4) > big.factored_cost(layer3, 4)


def test_gram_block_diagonal_is_the_per_layer_inverse(setup):
    model, ref, train, x, y, qg = setup["mlp"]
    solver = _fit(model, train, block_diagonal=True)
    G = ref.dense("fisher", x, y)
    # the dense G in the solver's layout, its off-diagonal layer blocks zeroed
    layout = solver.layout
    M = to_param_order(layout, model, torch.eye(layout.size, dtype=torch.float64))  # v_param = v_layout @ M
    G_layout = M @ G @ M.T
    mask = torch.zeros_like(G_layout)
    for b in layout.blocks:
        mask[b.slice, b.slice] = 1
    v = from_param_order(layout, model, qg)
    for lam in (1e-6, 1e-2):
        want = _dense_solve(G_layout * mask, v, lam)
        assert _rel(solver.precondition(v, lam), want) < 1e-7, lam
        # and it is not the full inverse (the layers are coupled in G)
        assert _rel(solver.precondition(v, lam), _dense_solve(G_layout, v, lam)) > 1e-2
    assert all(c.converged for c in solver.diagnostics().values())


def test_gram_refuses_what_it_cannot_do(setup):
    model, ref, train, x, y, qg = setup["mlp"]
    with pytest.raises(ConfigError, match="solver.max_rank"):
        _fit(model, train, max_rank=100)
    solver = _fit(model, train)
    with pytest.raises(ConfigError, match="λ > 0"):
        solver.precondition(from_param_order(solver.layout, model, qg), 0.0)
    with pytest.raises(ConfigError, match="solver.keep_gb"):
        Gram(keep_gb=-1)


def test_gram_cached_state_reloads(setup):
    """The cached state (eigenpairs) plus bind() reproduce the fitted solver's solves."""
    model, ref, train, x, y, qg = setup["mlp"]
    solver = _fit(model, train)
    other = Gram(**F64, batch_size=16)
    other.setup(model)
    other.load_state_dict(solver.state_dict())
    other.bind(model, train)
    v = from_param_order(solver.layout, model, qg)
    assert _rel(other.precondition(v, 1e-3), solver.precondition(v, 1e-3)) < 1e-12
    assert isinstance(other.layout, ParamLayout)


def test_ihvp_stage_with_the_gram_reference(run_pipeline):
    """The ihvp stage against ihvp.reference=gram, through the CLI's pipeline: the dense exact solver agrees with it
    to rounding at every damping (error ~0, scores' Spearman 1), the reference's own residual is recorded and within
    1e-6, and the spread over queries has its quartiles."""
    import pandas as pd

    run_dir, m = run_pipeline(["solver=exact", "dataset.subset=60", "trainer.epochs=1", "stages=[train,fit,ihvp]",
                               "query.n=3", "model=mlp", "model.hidden=4", "ihvp.reference=gram",
                               "solver.damping=[1e-6,1e-2]"])
    for d in ("1e-06", "0.01"):
        assert m[f"ihvp/rel_error@{d}"] < 1e-6 and m[f"ihvp/ref_converged@{d}"] is True
        assert m[f"ihvp/ref_rel_residual@{d}"] <= 1e-6
        assert m[f"ihvp/spearman@{d}"] > 1 - 1e-9
        assert m[f"ihvp/rel_error_q25@{d}"] <= m[f"ihvp/rel_error_median@{d}"] <= m[f"ihvp/rel_error_q75@{d}"]
    q = pd.read_csv(run_dir / "ihvp_queries.csv")
    assert len(q) == 6 and q["spearman"].min() > 1 - 1e-9


def test_ihvp_stage_reads_a_cached_reference_without_fitting_it(run_pipeline, cache_dir):
    """A second ihvp run on the same model and queries (another solver) takes the reference's solutions from the
    cache and neither fits nor loads the reference (its fit deleted from the cache stays absent), with the same
    errors as a run that has the reference fitted."""
    import json

    base = ["dataset.subset=60", "trainer.epochs=1", "stages=[train,fit,ihvp]", "query.n=3", "model=mlp",
            "model.hidden=4", "ihvp.reference=gram", "solver.damping=[1e-4,1e-2]", "solver=kfac"]
    _, first = run_pipeline([*base[:-1], "solver=exact"], name="exact")

    def gram_fits() -> list[Path]:
        return [p for p in (cache_dir / "factors").glob("*.json")
                if json.loads(p.read_text())["config"]["solver"]["solver"] == "gram"]

    fits = gram_fits()
    assert len(fits) == 1  # the first run fitted the reference
    for p in fits:
        p.unlink()
        p.with_suffix(".safetensors").unlink()
    _, m = run_pipeline(base, name="kfac")
    assert gram_fits() == []
    assert m["ihvp/ref_rel_residual@0.01"] == first["ihvp/ref_rel_residual@0.01"]
    # against the reference computed anew (a fresh cache): the same errors
    for p in (cache_dir / "ihvp_reference").glob("*"):
        p.unlink()
    _, again = run_pipeline(base, name="kfac_fresh_reference")
    assert len(gram_fits()) == 1
    for d in ("0.0001", "0.01"):
        assert abs(m[f"ihvp/rel_error@{d}"] - again[f"ihvp/rel_error@{d}"]) < 1e-6  # (the solve's rounding)

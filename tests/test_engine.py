"""Every scoring feature in the API (issue 28, item 3): ensembles, partitions, convergence reporting and damping
sharing through :class:`influencelab.Attributor`, the engine the CLI's ``score.ensemble``, ``score.partition``,
damping sweeps and ``solver/*@<damping>`` metrics run on. Float64 tiny models: equalities are exact where the
computation is the same, and the CLI's ensemble is checked against the API's on the same trained models."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

import influencelab
from conftest import make_config
from influencelab import Attributor
from influencelab.compose import build
from influencelab.errors import ConfigError
from influencelab.solvers.base import merge_diagnostics


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, 4, generator=g, dtype=torch.float64) + y[:, None].double(), y


def _model(seed: int) -> nn.Module:
    """A float64 MLP (4 -> 6 -> 3, tanh); seeds give independently initialised ensemble members."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


EKFAC = {"solver": "ekfac", "damping": [1e-3, 1e-1], "dtype": "float64"}


# -- (a) ensembles --------------------------------------------------------------------------------------------------
def test_an_ensemble_is_the_mean_of_its_members_own_attributors(tmp_path):
    """``Attributor([a, b, c])`` scores = the mean of ``Attributor(a)``, ``Attributor(b)``, ``Attributor(c)``'s,
    exactly; ``add_member`` builds the same ensemble; with a cache each member's fit is its own entry, which a
    single-model Attributor of that model then reuses."""
    x, y = _data()
    data, q = TensorDataset(x, y), TensorDataset(x[:5], y[:5])
    models = [_model(s) for s in (0, 1, 2)]
    ens = Attributor(models, cache_dir=tmp_path, **EKFAC).fit(data)
    pw, si = ens.pairwise(q), ens.self_influence()
    singles = [Attributor(m, **EKFAC).fit(data) for m in models]
    one_pw = [a.pairwise(q) for a in singles]
    assert pw.shape == (2, 5, 64) and not torch.allclose(one_pw[0], one_pw[1], rtol=0.05)
    assert torch.equal(pw, torch.stack(one_pw).mean(0))
    assert torch.equal(si, torch.stack([a.self_influence() for a in singles]).mean(0))
    grown = Attributor(models[0], **EKFAC)
    for m in models[1:]:
        grown.add_member(m)
    assert torch.equal(grown.fit(data).pairwise(q), pw)
    assert len(list((tmp_path / "factors").glob("*.safetensors"))) == 3  # one fit per model, each under its key
    again = Attributor(models[2], cache_dir=tmp_path, **EKFAC).fit(data)
    assert again.fit_info.cached and again.fit_key == ens.members[2].fit_key
    with pytest.raises(ConfigError, match="one key per model"):
        Attributor(models, model_key="k")


def test_the_clis_ensemble_is_the_apis_on_the_same_models_and_shares_its_cache_keys(run_pipeline, cache_dir, tmp_path):
    """``score.ensemble=2`` from the CLI: an API ensemble of the two trained models (the run's and the member the CLI
    trained with ``trainer.seed + 1000``), computed afresh without a cache, gives the CLI's scores; given the CLI's
    cache and model keys, each member's factors are the CLI's cache entries (no refit) and the scores its chunks."""
    tiny = ["dataset.subset=200", "trainer.epochs=1", "model=mlp", "query.n=4", "solver.damping=[1e-3,0.1]",
            "stages=[train,fit,pairwise,self]"]
    run_dir, _ = run_pipeline([*tiny, "score.ensemble=2"])
    run = influencelab.load_run(run_dir)
    from influencelab.pipeline import Context

    member_cfg = make_config([*tiny, f"trainer.seed={int(run.config.trainer.seed) + 1000}"], cache_dir)
    member = Context(member_cfg, tmp_path / "member")  # the member's model, from the CLI's cache
    assert member.artifacts.cache.get("models", member.model_key) is not None
    models = [run.model, member.model]
    cli_pw = load_file(str(run_dir / "scores" / "pairwise.safetensors"))
    cli_self = load_file(str(run_dir / "scores" / "self.safetensors"))
    qpos = torch.searchsorted(run.test.indices, cli_pw["query_indices"])
    queries = run.test.subset(qpos)

    fresh = Attributor(models, solver="ekfac", damping=[1e-3, 0.1], seed=int(run.config.seed))
    fresh.fit(TensorDataset(run.train.x, run.train.targets))
    for got, want in ((fresh.pairwise(TensorDataset(queries.x, queries.targets)), cli_pw["scores_by_damping"]),
                      (fresh.self_influence(), cli_self["scores_by_damping"])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))

    cached = run.attributor()  # the run's solver config, cache and model key
    cached.add_member(member.model, model_key=member.model_key, solver=build(run.config.solver, device="cpu"))
    assert [m.fit_info.cached for m in cached.members] == [True, True]
    assert torch.equal(cached.pairwise(queries, query_key=qpos.tolist()), cli_pw["scores_by_damping"])
    assert torch.equal(cached.self_influence(), cli_self["scores_by_damping"])


# -- (b) partitions -------------------------------------------------------------------------------------------------
def test_partitions_are_none_until_every_share_is_cached_then_the_full_scores(tmp_path):
    x, y = _data()
    data, q = TensorDataset(x, y), TensorDataset(x[:3], y[:3])
    models = [_model(0), _model(1)]
    # (the reference chunks the training set as the shares do: bitwise equality tests how the cached chunks are put
    # together, not whether a CPU's BLAS rounds a 16-row and a 64-row product alike)
    full = Attributor(models, chunk_size=16, **EKFAC).fit(data)
    want_pw, want_self = full.pairwise(q), full.self_influence()

    def part() -> Attributor:  # a separate job: a new Attributor on the shared cache
        return Attributor(models, cache_dir=tmp_path, chunk_size=16, **EKFAC).fit(data)

    assert part().pairwise(q, partition=(0, 2)) is None
    assert part().self_influence(partition=(0, 2)) is None
    assert torch.equal(part().pairwise(q, partition=(1, 2)), want_pw)  # the last share finds every chunk
    assert torch.equal(part().pairwise(q), want_pw)  # and so does a call without partition, from the cache alone
    assert torch.equal(part().self_influence(partition=(1, 2)), want_self)
    with pytest.raises(ConfigError, match=r"partition=\(2, 2\) is invalid: use \(i, k\) with 0 <= i < k"):
        part().pairwise(q, partition=(2, 2))
    with pytest.raises(ConfigError, match="partition=0/2 needs a cache.*set cache_dir"):
        full.pairwise(q, partition=(0, 2))


# every solver with a fit of its own (TracIn needs a model trained with checkpoints: it has no fit to cache)
@pytest.mark.parametrize("solver", sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "solver").glob("*.yaml")
                                          if p.stem != "tracin"))
def test_a_job_on_cached_factors_scores_bitwise_as_the_job_that_fitted_them(tmp_path, solver):
    """A partition's or a rerun's job loads the fit from the cache while the first job scores with the fit it just
    computed: both must give the same scores to the last bit, or a partitioned run differs from an unpartitioned
    one (CI's machine found EK-FAC's eigenbases column-major after the fit, row-major after the cache, and its BLAS
    rounding the two products differently)."""
    x, y = _data()
    data, q = TensorDataset(x, y), TensorDataset(x[:3], y[:3])
    model, kw = _model(0), {"solver": solver, "damping": [1e-3, 1e-1], "dtype": "float64"}
    Attributor(model, cache_dir=tmp_path, **kw).fit(data)  # writes the fit, scores nothing
    fitted = Attributor(model, **kw).fit(data)
    loaded = Attributor(model, cache_dir=tmp_path, **kw).fit(data)
    assert [m.fit_info.cached for m in loaded.members] == [True]
    assert torch.equal(fitted.pairwise(q), loaded.pairwise(q))
    assert torch.equal(fitted.self_influence(), loaded.self_influence())


def _untimed(record: dict) -> dict:
    """A convergence record without its wall times (which differ between runs)."""
    return {d: dataclasses.replace(c, solve_s=0.0, measure_s=0.0) for d, c in record.items()}


# -- (c) convergence ------------------------------------------------------------------------------------------------
def test_unconverged_dampings_are_reported_worst_over_members_and_passes_with_the_fix(caplog):
    """CG stopped after 2 iterations: per damping, ``convergence`` is the worst over the ensemble's models and the
    scoring passes, ``on_metrics`` gets ``solver/*@<damping>``, and each unconverged damping is a warning naming the
    fix in the API's terms; a damping far above the curvature converges and is not warned about."""
    x, y = _data()
    data, q = TensorDataset(x, y), TensorDataset(x[:3], y[:3])
    models = [_model(0), _model(1)]
    cg = {"solver": "cg", "damping": [1e-2, 1e4], "max_iter": 2, "tol": 1e-6, "dtype": "float64"}
    logged: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="influencelab"):
        attr = Attributor(models, on_metrics=logged.append, **cg).fit(data)
        attr.pairwise(q)
        after_pairwise = dict(attr.convergence)
        attr.self_influence()
    singles = [Attributor(m, **cg).fit(data) for m in models]
    for a in singles:
        a.pairwise(q)
    by_member = merge_diagnostics(*(a.diagnostics for a in singles))
    assert _untimed(attr.convergence_by_pass["pairwise"]) == _untimed(by_member) == _untimed(after_pairwise)
    c = attr.convergence[1e-2]
    assert not c.converged and c.iterations == 2
    assert c.rel_residual_max == max(by_member[1e-2].rel_residual_max,
                                     attr.convergence_by_pass["self"][1e-2].rel_residual_max)
    assert c.n_vectors == 2 * 3 + 2 * 64  # both models' queries, then both models' training points
    assert attr.convergence[1e4].converged
    assert logged[-1]["solver/converged@0.01"] is False and logged[-1]["solver/iterations@0.01"] == 2
    assert logged[-1]["solver/rel_residual_max@0.01"] == c.rel_residual_max
    warned = [r.getMessage() for r in caplog.records if "UNCONVERGED" in r.getMessage()]
    assert any(w.startswith("the pairwise scores at damping=0.01") and "raise max_iter (now 2) or damping" in w
               for w in warned)
    assert not any("damping=10000" in w for w in warned)
    direct = Attributor(models[0], **EKFAC).fit(data)
    direct.pairwise(q)
    assert direct.convergence == {} and direct.convergence_by_pass == {"pairwise": {}}


# -- (d) damping sharing --------------------------------------------------------------------------------------------
def test_a_shared_damping_pass_keeps_the_own_rows_and_is_cached_once_for_every_sharer(tmp_path):
    """The jobs of a sweep over [a, b]: job b scores [a, b] in one pass and keeps b's rows, equal to scoring b
    alone; job a then reads its rows from the same cached pass (one score key for the sweep)."""
    x, y = _data()
    data, q = TensorDataset(x, y), TensorDataset(x[:3], y[:3])
    net = _model(0)
    a, b = 1e-3, 1e-1

    def job(own: float) -> Attributor:
        return Attributor(net, solver="ekfac", damping=own, dtype="float64", shared_dampings=[a, b],
                          cache_dir=tmp_path).fit(data)

    got_b = job(b).pairwise(q)
    alone = Attributor(net, solver="ekfac", damping=b, dtype="float64").fit(data).pairwise(q)
    assert got_b.shape == (1, 3, 64)
    torch.testing.assert_close(got_b, alone, rtol=1e-12, atol=1e-12 * float(alone.abs().max()))
    got_a = job(a).pairwise(q)
    both = Attributor(net, solver="ekfac", damping=[a, b], dtype="float64").fit(data).pairwise(q)
    torch.testing.assert_close(got_a[0], both[0], rtol=1e-12, atol=1e-12 * float(both.abs().max()))
    assert len([d for d in (tmp_path / "pairwise").iterdir() if d.is_dir()]) == 1  # one pass for both jobs


def test_a_diverging_shared_damping_falls_back_to_the_own_ones(caplog):
    """LiSSA with a fixed scale: the shared pass diverges because of 1e6 (far above the scale), so the call scores
    its own damping alone and returns what scoring it alone gives."""
    x, y = _data()
    data, q = TensorDataset(x, y), TensorDataset(x[:3], y[:3])
    lissa = {"solver": "lissa", "damping": 0.1, "depth": 10, "batch_size": 8, "scale": 1000.0, "dtype": "float64"}
    with caplog.at_level(logging.WARNING, logger="influencelab"):
        got = Attributor(_model(0), shared_dampings=[0.1, 1e6], **lissa).fit(data).pairwise(q)
    assert "the shared pass over dampings [0.1, 1000000.0] failed" in caplog.text
    assert torch.equal(got, Attributor(_model(0), **lissa).fit(data).pairwise(q))


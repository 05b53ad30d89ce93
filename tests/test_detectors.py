"""#33 item 3 and its fixes: TRAK and TracIn refused by the stages that need parameter-space vectors (one line, exit
2), ``load_run(...).attributor("tracin")`` with the run's training checkpoints, and the mislabel stage's detectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy.stats import rankdata
from torch.func import functional_call, grad, vmap

from conftest import make_config, run_cli
from influencelab.errors import ConfigError
from influencelab.pipeline import Context
from influencelab.run import load_run
from influencelab.tracking import Tracker
from influencelab.train import get_checkpoints

TINY = ["dataset=digits", "dataset.subset=60", "model=mlp", "model.hidden=8", "trainer.epochs=2",
        "trainer.device=cpu", "query.n=4", "solver.dtype=float64"]


# -- (a) trak / tracin in the ihvp and unlearn stages: refused before anything runs ------------------------------
@pytest.mark.parametrize("extra, stage", [
    (["solver=trak", "stages=[train,unlearn]", "dataset.label_noise=0.1"], "unlearn"),
    (["solver=tracin", "trainer.checkpoints=2", "stages=[train,unlearn]", "dataset.label_noise=0.1"], "unlearn"),
    (["solver=trak", "stages=[train,ihvp]", "solver.damping=0.01"], "ihvp"),
    (["solver=tracin", "trainer.checkpoints=2", "stages=[train,ihvp]", "solver.damping=0.01"], "ihvp"),
    (["solver=ekfac", "stages=[train,ihvp]", "solver.damping=0.01", "ihvp.reference=tracin"],
     r"ihvp \(as ihvp.reference\)"),
])
def test_stages_needing_parameter_vectors_refuse_trak_and_tracin(tmp_path, extra, stage):
    with pytest.raises(ConfigError, match=rf"solver=(trak|tracin) is invalid for stage {stage}: .*use a curvature "
                                          r"solver there, e.g. solver=ekfac"):
        Context(make_config([*TINY, *extra], tmp_path / "cache"), tmp_path / "run", Tracker(backend="none"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_cli_refuses_trak_for_unlearn_in_one_line(tmp_path):
    r = run_cli([*TINY, "solver=trak", "stages=[train,unlearn]", "dataset.label_noise=0.1", "logger=none",
                 f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "solver=trak is invalid for stage unlearn" in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


# -- (b) load_run(...).attributor("tracin") gets the run's checkpoints -------------------------------------------
def test_load_run_attributor_tracin_has_the_runs_checkpoints(run_pipeline, cache_dir):
    """A run trained with trainer.checkpoints=2 (any solver): its loaded model gets the checkpoints of its cached
    model entry, and TracIn's self-influence from the API equals the CLI's; a run trained without them: the one-line
    error that says how to get them."""
    run_a, _ = run_pipeline([*TINY, "trainer.checkpoints=2", "solver=tracin", "stages=[train,self]"], "a")
    cli = load_file(str(run_a / "scores" / "self.safetensors"))["scores"]
    run = load_run(run_a)
    assert get_checkpoints(run.model) == []  # (attached when an attributor is asked for)
    api = run.attributor().self_influence()[0]
    assert len(get_checkpoints(run.model)) == 2
    torch.testing.assert_close(api, cli, rtol=1e-10, atol=0)
    again = load_run(run_a).attributor("tracin", dtype="float64").self_influence()[0]  # (by name, from a fresh load)
    torch.testing.assert_close(again, cli, rtol=1e-10, atol=0)
    # the checkpoints are the trainer's, not copies of the final weights: the sum over two differs from the last one
    last = load_run(run_a).attributor("identity", dtype="float64").self_influence()[0] * get_checkpoints(run.model)[-1].lr
    assert (api - last).abs().max() > 1e-3 * last.abs().max()

    run_b, _ = run_pipeline([*TINY, "solver=ekfac", "stages=[train]"], "b")
    with pytest.raises(ConfigError, match="solver=tracin needs the training checkpoints"):
        load_run(run_b).attributor("tracin")


# -- item 3: the mislabel stage's detectors ------------------------------------------------------------------------
def test_rank_average_is_the_mean_rank_with_ties_sharing():
    from influencelab.stages.mislabel import rank_average

    loss = np.array([0.1, 5.0, 0.3, 0.3])  # ranks 1, 4, 2.5, 2.5
    inf = np.array([9.0, 1.0, 2.0, 3.0])  # ranks 4, 1, 2, 3
    np.testing.assert_allclose(rank_average(loss, inf), [(1 + 4) / 8, (4 + 1) / 8, (2.5 + 2) / 8, (2.5 + 3) / 8])


def test_relatif_equals_dense_normalised_self_influence(tmp_path):
    """RelatIF ``g^T (F + λI)^-1 g / ||(F + λI)^-1 g||`` with the empirical Fisher ``F`` built densely from torch.func
    per-example gradients of the trained model (float64) and solved with torch.linalg.solve."""
    from influencelab.stages.mislabel import relatif_scores

    lam = 1e-2
    cfg = make_config([*TINY, "dataset.label_noise=0.1", "solver=exact", "solver.curvature=empirical_fisher",
                       f"solver.damping={lam}", "stages=[train,fit,self,mislabel]", "mislabel.relatif=true"],
                      tmp_path / "cache")
    ctx = Context(cfg, tmp_path / "run", Tracker(backend="none"))
    got = relatif_scores(ctx)
    model = ctx.attributor.model
    train = ctx.train_data
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    model64 = ctx.build_model().double()

    def f(p, xi, yi):
        return F.cross_entropy(functional_call(model64, p, (xi[None],)), yi[None])

    gd = vmap(grad(f), in_dims=(None, 0, 0))(params, train.x.double(), train.targets)
    g = torch.cat([v.reshape(len(train), -1) for v in gd.values()], dim=1)
    fisher = g.T @ g / len(train)
    h = torch.linalg.solve(fisher + lam * torch.eye(len(fisher), dtype=torch.float64), g.T).T
    ref = (g * h).sum(1) / h.norm(dim=1)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6)
    # (not the plain self-influence: the normalisation changes the order)
    assert not np.array_equal(np.argsort(got), np.argsort((g * h).sum(1).numpy()))


@pytest.mark.parametrize("extra, match", [
    (["solver=identity"], "mislabel.relatif=true is invalid with solver=identity"),
    (["solver=trak"], "solver=trak is invalid for stage mislabel with mislabel.relatif=true"),
    (["solver=tracin", "trainer.checkpoints=2"], "solver=tracin is invalid for stage mislabel"),
])
def test_relatif_needs_a_curvature_solver(tmp_path, extra, match):
    cfg = make_config([*TINY, "dataset.label_noise=0.1", "stages=[train,fit,self,mislabel]", "mislabel.relatif=true",
                       *extra], tmp_path / "cache")
    with pytest.raises(ConfigError, match=match):
        Context(cfg, tmp_path / "run", Tracker(backend="none"))


def test_mislabel_stage_reports_the_rank_averages_against_the_loss(run_pipeline):
    """The stage logs each rank average beside its parts, paired against the loss; the combination's recall equals
    the one computed here from the run's saved self-influence and the loss."""
    from influencelab.evaluation import recall_at
    from influencelab.train import per_example_loss

    run_dir, m = run_pipeline([*TINY, "dataset.label_noise=0.2", "solver=kfac", "query.n=30", "mislabel.heldout=true",
                               "stages=[train,fit,self,pairwise,mislabel]"])
    for name in ("self_influence", "identity", "loss", "loss_and_self_influence", "loss_and_identity", "random",
                 "heldout_harm", "loss_and_heldout_harm"):
        assert f"mislabel/{name}/recall@10" in m
    assert "mislabel/loss_and_self_influence/minus_loss_top10_ci_low" in m and "mislabel/relatif/recall@10" not in m
    run = load_run(run_dir)
    flipped = run.flipped.numpy()
    loss = per_example_loss(run.model, run.train).numpy()
    ranks = (rankdata(loss) + rankdata(run.self_scores.numpy())) / 2
    assert m["mislabel/loss_and_self_influence/recall@20"] == pytest.approx(recall_at(ranks, flipped, 0.2))
    # held-out harm: the summed negative part of the 30 test queries' scores, from the saved pairwise file
    pw = run.pairwise_scores.double().numpy()
    harm = np.where(pw < 0, -pw, 0.0).sum(0)
    assert m["mislabel/heldout_harm/recall@20"] == pytest.approx(recall_at(harm, flipped, 0.2))
    both = (rankdata(loss) + rankdata(harm)) / 2
    assert m["mislabel/loss_and_heldout_harm/recall@10"] == pytest.approx(recall_at(both, flipped, 0.1))

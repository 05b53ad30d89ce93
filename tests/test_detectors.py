"""#33 item 3 and its fixes: TRAK and TracIn refused by the stages that need parameter-space vectors (one line, exit
2), ``load_run(...).attributor("tracin")`` with the run's training checkpoints, and the mislabel stage's detectors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

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


def test_parameter_space_solvers_still_run_the_ihvp_stage(run_pipeline):
    """(the refusal is of trak and tracin only: identity against the exact reference still runs)"""
    _, m = run_pipeline([*TINY, "solver=identity", "stages=[train,ihvp]", "solver.damping=0.1",
                         "ihvp.reference=exact", "ihvp.scores=false"])
    assert m["ihvp/rel_error"] > 0


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

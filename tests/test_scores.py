"""Scores through the pipeline: the quickstart, caching, chunking, dampings, partitions, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import influencelab
from conftest import run_cli

TINY = ["dataset.subset=300", "dataset.label_noise=0.1", "trainer.epochs=3", "query.n=4"]


def test_quickstart_end_to_end(run_pipeline):
    run_dir, m = run_pipeline(["experiment=quickstart"])
    for key in ("time/fit_s", "time/pairwise_s", "time/self_s", "mislabel/self_influence/recall@10",
                "mislabel/self_influence/recall@20", "mislabel/loss/recall@10", "mislabel/identity/recall@10",
                "mislabel/random/recall@10", "mem/peak_rss_mb"):
        assert key in m, key
    assert m["mislabel/self_influence/recall@20"] > 2 * m["mislabel/random/recall@20"]
    for fig in ("training", "mislabel_detection", "attribution"):
        assert (run_dir / "figures" / f"{fig}.png").stat().st_size > 10_000
    run = influencelab.load_run(run_dir)
    assert run.pairwise_scores.shape == (3, len(run.train)) and run.self_scores.shape == (len(run.train),)
    assert run.scores("pairwise")["query_indices"].shape == (3,)
    assert torch.equal(run.scores("self")["train_indices"], run.train.indices)


def test_self_scores_equal_diagonal_of_pairwise_through_the_pipeline(run_pipeline):
    """Queries = training points, scored through the run's Attributor (the CLI's path, its cached factors):
    self-influence from the pipeline equals the diagonal of the pairwise matrix."""
    run_dir, _ = run_pipeline([*TINY, "stages=[train,fit,self]"], "a")
    run = influencelab.load_run(run_dir)
    attr = run.attributor()
    assert attr.fit_info.cached  # the pipeline's factors, found under the same key
    pos = [0, 5, 17]
    pw = attr.pairwise(run.train.subset(pos))[0]
    torch.testing.assert_close(pw[:, pos].diagonal(), run.self_scores[pos], rtol=1e-4, atol=1e-6)


def test_batch_size_chunking_and_damping_lists_do_not_change_scores(run_pipeline):
    _, _ = run_pipeline([*TINY, "stages=[train]"], "train")
    runs = {}
    for name, extra in {"base": [], "chunked": ["score.chunk_size=37", "score.batch_size=11"],
                        "list": ["solver.damping=[1e-3,1e-2]"], "other": ["solver.damping=1e-2"]}.items():
        d, _ = run_pipeline([*TINY, "stages=[fit,pairwise,self]", *extra], name)
        runs[name] = {k: _load(d / "scores" / f"{k}.safetensors") for k in ("pairwise", "self")}
    for k in ("pairwise", "self"):  # float32: equal up to round-off relative to the scores' scale
        tol = {"rtol": 1e-4, "atol": 1e-5 * float(runs["base"][k]["scores"].abs().max())}
        torch.testing.assert_close(runs["chunked"][k]["scores"], runs["base"][k]["scores"], **tol)
        torch.testing.assert_close(runs["list"][k]["scores"], runs["base"][k]["scores"], **tol)
        torch.testing.assert_close(runs["list"][k]["scores_by_damping"][1], runs["other"][k]["scores"], **tol)


def test_multirun_over_damping_scores_once_and_each_job_equals_a_single_run(tmp_path, run_pipeline):
    """``-m solver.damping=a,b``: the first job scores every swept value in one pass (one cached score set
    for the sweep, not one per job), and each job's scores are those of a separate single-damping run."""
    dampings = ["1e-3", "0.1"]
    r = run_cli(["-m", *TINY, "stages=[train,fit,self,pairwise]", f"solver.damping={','.join(dampings)}"], tmp_path)
    assert r.returncode == 0, r.stderr
    for kind in ("self", "pairwise"):  # chunks of one score key each: computed once for the whole sweep
        assert len([d for d in (tmp_path / "cache" / kind).iterdir() if d.is_dir()]) == 1, kind
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    for job, d in enumerate(dampings):
        single, _ = run_pipeline([*TINY, "stages=[fit,self,pairwise]", f"solver.damping={d}"], f"single{d}")
        for k in ("self", "pairwise"):
            got = _load(sweep / str(job) / "scores" / f"{k}.safetensors")
            want = _load(single / "scores" / f"{k}.safetensors")
            # the job saves its own damping only: its damping axis has one entry (the axis is always there)
            assert got["scores_by_damping"].shape[0] == 1
            torch.testing.assert_close(got["scores_by_damping"][0], got["scores"])
            tol = {"rtol": 1e-4, "atol": 1e-5 * float(want["scores"].abs().max())}
            torch.testing.assert_close(got["scores"], want["scores"], **tol)
    assert len([d for d in (tmp_path / "cache" / "self").iterdir() if d.is_dir()]) == 3  # + 2 single runs


def test_a_diverging_swept_damping_fails_only_its_own_job(tmp_path):
    """LiSSA with a fixed scale over ``solver.damping=1e-3,1e6``: the shared pass diverges because of 1e6 (far
    above the scale), so the 1e-3 job scores its own damping alone and succeeds, while the 1e6 job reports the
    divergence (sweep exit status 2)."""
    r = run_cli(["-m", *TINY, "stages=[train,fit,pairwise]", "solver=lissa", "solver.depth=10",
                 "solver.batch_size=64", "solver.scale=1000", "solver.damping=1e-3,1e6"], tmp_path)
    assert r.returncode == 2 and "1 job(s) of the sweep failed" in r.stderr
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    assert "LiSSA diverged" in (sweep / "1" / "error.txt").read_text()
    good = _load(sweep / "0" / "scores" / "pairwise.safetensors")["scores"]
    assert good.shape == (4, 300) and torch.isfinite(good).all()


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_ensemble_scores_are_the_mean_over_independently_trained_models(run_pipeline):
    """score.ensemble=2 averages the scores of the run's model and of one trained with trainer.seed + 1000."""
    base = [*TINY, "stages=[train,fit,pairwise,self]"]
    ens, _ = run_pipeline([*base, "score.ensemble=2"], "ens")
    one, _ = run_pipeline(base, "one")
    other, _ = run_pipeline([*base, "trainer.seed=1000"], "other")
    for k in ("pairwise", "self"):
        a, b = _load(one / "scores" / f"{k}.safetensors")["scores"], _load(other / "scores" / f"{k}.safetensors")["scores"]
        assert not torch.allclose(a, b, rtol=0.05)  # the two models really differ
        torch.testing.assert_close(_load(ens / "scores" / f"{k}.safetensors")["scores"], (a + b) / 2)


def test_scores_are_cached_and_factors_reused(run_pipeline, cache_dir):
    _, m1 = run_pipeline([*TINY, "stages=[train,fit,self]"], "a")
    n_chunks = len(list((cache_dir / "self").rglob("*.safetensors")))
    _, m2 = run_pipeline([*TINY, "stages=[train,fit,self]", "solver.damping=1e-2"], "b")
    assert len(list((cache_dir / "factors").glob("*.safetensors"))) == 1  # one fit serves both dampings
    assert len(list((cache_dir / "self").rglob("*.safetensors"))) == 2 * n_chunks


def test_partitions_merge_to_the_full_run(run_pipeline):
    base = [*TINY, "stages=[train,fit,self]", "score.chunk_size=50"]
    full_dir, _ = run_pipeline(base, "full")
    from conftest import make_config
    from influencelab.cli import run

    cache = full_dir.parent / "cache_parts"
    for i in range(2):
        cfg = make_config([*base, f"score.partition={i}/3"], cache)
        m = run(cfg, full_dir.parent / f"part{i}")  # a separate cache: the partitions compute everything
        assert m["score/self_partition"] == f"{i}/3"
        assert not (full_dir.parent / f"part{i}" / "scores" / "self.safetensors").exists()
    # the last partition to finish finds every chunk and writes the merged scores itself ...
    run(make_config([*base, "score.partition=2/3"], cache), full_dir.parent / "part2")
    last = _load(full_dir.parent / "part2" / "scores" / "self.safetensors")["scores"]
    # ... and so does a run without score.partition, from the cache alone
    merged = run(make_config(base, cache), full_dir.parent / "merged")
    assert merged["time/self_s"] < 5
    full = _load(full_dir / "scores" / "self.safetensors")["scores"]
    torch.testing.assert_close(_load(full_dir.parent / "merged" / "scores" / "self.safetensors")["scores"], full)
    torch.testing.assert_close(last, full)


def test_divergence_is_one_line_error_and_nothing_saved(tmp_path):
    r = run_cli([*TINY, "solver=lissa", "solver.scale=1e-4", "solver.depth=50", "stages=[train,fit,pairwise]"],
                tmp_path)
    assert r.returncode == 2 and "scale" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list((tmp_path / "outputs").rglob("pairwise.safetensors"))
    assert not (tmp_path / "cache" / "pairwise").exists() or not list((tmp_path / "cache" / "pairwise").rglob("*.safetensors"))


def test_sigkill_during_scoring_resumes_with_identical_results(tmp_path):
    """Kill the process mid-way through self-influence chunks; the re-run reuses the finished chunks."""
    args = ["dataset=digits", "dataset.label_noise=0.1", "trainer.epochs=2", "stages=[train,fit,self]",
            "score.chunk_size=16", "score.batch_size=16", "solver=exact", "model=mlp", "model.hidden=8",
            "hydra.run.dir=run"]
    env = {**os.environ, "WANDB_MODE": "disabled", "INFLUENCELAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "influencelab", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = tmp_path / "cache" / "self"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(chunks.rglob("*.json"))) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(chunks.rglob("*.json")))
    total = -(-1437 // 16)
    assert 5 <= done < total, done
    r = run_cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    resumed = _load(tmp_path / "run" / "scores" / "self.safetensors")["scores"]
    r2 = run_cli([*args, "hydra.run.dir=fresh"], tmp_path, env={"INFLUENCELAB_CACHE": str(tmp_path / "cache2")})
    assert r2.returncode == 0, r2.stderr
    fresh = _load(tmp_path / "fresh" / "scores" / "self.safetensors")["scores"]
    torch.testing.assert_close(resumed, fresh, rtol=1e-12, atol=0)  # float64: equal up to BLAS round-off
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train/cached"] is True


def test_sigkill_during_fitting_resumes_with_identical_factors(tmp_path):
    """Kill the process in EK-FAC's eigenvalue-correction pass; the re-run restores the snapshotted sums and
    sampling state, skips the finished batches and ends with the factors of an uninterrupted fit."""
    args = ["dataset=digits", "trainer.epochs=1", "stages=[train,fit]", "model=mlp", "model.hidden=16",
            "solver=ekfac", "solver.dtype=float64", "solver.batch_size=8", "fit.checkpoint_s=0", "hydra.run.dir=run"]
    env = {**os.environ, "WANDB_MODE": "disabled", "INFLUENCELAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "influencelab", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    snaps = tmp_path / "cache" / "snapshots"
    deadline = time.time() + 240
    while time.time() < deadline and not list(snaps.glob("*-correction-?.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cache" / "factors").exists(), "the fit finished before the kill"
    assert list(snaps.glob("*-covariances-?.json")) and list(snaps.glob("*-correction-?.json"))
    r = run_cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming ekfac correction from batch" in r.stdout + r.stderr, r.stdout[-2000:]
    assert not list(snaps.glob("*.json")), "snapshots are removed once the factors are cached"
    r2 = run_cli(args, tmp_path, env={"INFLUENCELAB_CACHE": str(tmp_path / "cache2")})
    assert r2.returncode == 0, r2.stderr
    resumed, fresh = (_load(next((tmp_path / c / "factors").glob("*.safetensors"))) for c in ("cache", "cache2"))
    assert resumed.keys() == fresh.keys()
    for k in fresh:
        torch.testing.assert_close(resumed[k], fresh[k], rtol=0, atol=0)


def test_a_torn_snapshot_write_falls_back_to_the_other_slot(tmp_path):
    """A kill between replacing a snapshot's tensors and its JSON leaves that slot corrupt; the other slot
    still holds the previous snapshot, so the resume loses one snapshot at most, never all of them."""
    from influencelab.cache import Cache, Snapshots, save_tensors

    snaps = Snapshots(Cache(tmp_path), "k", every_s=0)
    for done in (1, 2, 3):
        snaps.save("phase", done, {"sum": torch.full((3,), float(done))})
    assert Snapshots(Cache(tmp_path), "k").load("phase")[0] == 3
    # the 4th save goes to the slot holding done=2; tear it: new tensors written, JSON still the old one
    older = min(tmp_path.glob("snapshots/k-phase-?.json"), key=lambda p: json.loads(p.read_text())["done"])
    save_tensors(older.with_suffix(".safetensors"), {"sum": torch.full((3,), 4.0)})
    done, tensors = Snapshots(Cache(tmp_path), "k").load("phase")
    assert done == 3 and torch.equal(tensors["sum"], torch.full((3,), 3.0))
    assert not older.exists(), "the torn slot is removed"

"""Scale-out: torchrun with 2 CPU processes (gloo) equals 1 process; a 2-job sweep through submitit_local."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["dataset=digits", "dataset.subset=301", "dataset.label_noise=0.1", "trainer.epochs=2", "solver=ekfac",
        "solver.dtype=float64", "solver.batch_size=40", "solver.curvature=empirical_fisher", "query.n=5",
        "score.chunk_size=50", "score.batch_size=32", "stages=[train,fit,self,pairwise]", "logger=none"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path, cache: str) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "INFLUENCELAB_CACHE": str(tmp_path / cache), "OMP_NUM_THREADS": "1"}


def _one_and_two_processes(tmp_path, args: list[str]) -> None:
    """Run ``args`` as 1 process (run dir ``one``, cache ``c1``) and under torchrun with 2 (``two``, ``c2``)."""
    one = subprocess.run([sys.executable, "-m", "influencelab", *args, "hydra.run.dir=one"], cwd=tmp_path,
                         env=_env(tmp_path, "c1"), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "influencelab", *args, "hydra.run.dir=two"],
                         cwd=tmp_path, env=_env(tmp_path, "c2"), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]


def test_two_processes_equal_one(tmp_path):
    """Uneven shards (301 points over 2 ranks, 7 score chunks): factors and scores match a single process."""
    _one_and_two_processes(tmp_path, ARGS)
    for kind in ("factors",):
        (f1,), (f2,) = (list((tmp_path / c / kind).glob("*.safetensors")) for c in ("c1", "c2"))
        a, b = load_file(str(f1)), load_file(str(f2))
        for k in a:
            if k.endswith("lambda"):
                torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12)
    for name in ("self", "pairwise"):
        s1 = load_file(str(tmp_path / "one" / "scores" / f"{name}.safetensors"))["scores"]
        s2 = load_file(str(tmp_path / "two" / "scores" / f"{name}.safetensors"))["scores"]
        torch.testing.assert_close(s1, s2, rtol=1e-8, atol=1e-10)
    assert not list(tmp_path.glob("influencelab-rank*"))  # only rank 0 wrote a run directory here


def test_two_processes_split_lissa_products(tmp_path):
    """LiSSA's scale estimate and query IHVPs split each batch's curvature products over 2 ranks (an odd batch
    of 7: uneven shares); pairwise scores equal one process's."""
    args = [*ARGS[:4], "solver=lissa", "solver.dtype=float64", "solver.batch_size=7", "solver.depth=15",
            "solver.damping=0.1", "query.n=3", "score.chunk_size=50", "stages=[train,fit,pairwise]", "logger=none"]
    _one_and_two_processes(tmp_path, args)
    s1, s2 = (load_file(str(tmp_path / d / "scores" / "pairwise.safetensors"))["scores"] for d in ("one", "two"))
    torch.testing.assert_close(s1, s2, rtol=1e-8, atol=1e-10)


def test_submitit_local_two_job_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    r = subprocess.run([sys.executable, "-m", "influencelab", "-m", "hydra/launcher=submitit_local",
                        "hydra.launcher.timeout_min=10", "dataset=digits", "dataset.subset=200", "trainer.epochs=1",
                        "seed=0,1", "logger=none", "hydra.sweep.dir=sweep"], cwd=tmp_path,
                       env=_env(tmp_path, "cache"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(jobs) == 2

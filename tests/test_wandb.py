"""W&B runs as a researcher finds them, read back from the offline run records of real CLI jobs: group (the sweep's
or run's ``<date>/<time>``), name (the job's overrides), tags and job type (the Hydra choices), score artifacts named
per run with their solver/dampings/sizes, the trained model as a ``model`` artifact; and a W&B run that could not
start (no wandb, online without a login) as one line with exit status 2, before anything is read or written."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from influencelab.errors import ConfigError
from influencelab.tracking import MAX_NAME, Tracker, run_group, run_name, wandb_logged_in

SMALL = ["dataset=digits", "dataset.subset=200", "trainer.epochs=1", "model=mlp", "logger=wandb"]
DATE_TIME = r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d"


def wandb_env(tmp_path: Path) -> dict[str, str]:
    """W&B offline with all its files (run records, artifact staging, settings) under ``tmp_path``."""
    home = tmp_path / "wandb-home"
    dirs = {"WANDB_DIR": "runs", "WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache", "WANDB_CONFIG_DIR": "config",
            "WANDB_ARTIFACT_DIR": "artifacts"}
    return {"WANDB_MODE": "offline", **{k: str(home / v) for k, v in dirs.items()}}


def records(path: Path) -> Iterator[Any]:
    """The protobuf records of a ``run-*.wandb`` file: a header, then LevelDB-log framing (32 KiB blocks of chunks
    ``crc32 u32, length u16, type u8``; types full=1, first=2, middle=3, last=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is zero padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def offline_run(run_dir: Path) -> tuple[Any, dict[str, tuple[str, dict]]]:
    """The W&B run record of a job's run dir and its artifacts: ``{name: (type, metadata)}``."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    run, artifacts = None, {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "artifact":
            artifacts[r.artifact.name] = (r.artifact.type, json.loads(r.artifact.metadata or "{}"))
    assert run is not None
    return run, artifacts


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_single_run_identity_and_model_artifact(tmp_path):
    r = run_cli([*SMALL, "stages=[train]"], tmp_path, env=wandb_env(tmp_path))
    assert r.returncode == 0, r.stderr
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    run, artifacts = offline_run(run_dir)
    assert run.run_group == f"{run_dir.parent.name}/{run_dir.name}" and re.fullmatch(DATE_TIME, run.run_group)
    assert run.display_name == "dataset=digits,dataset.subset=200,trainer.epochs=1,model=mlp,stages=[train]"
    assert list(run.tags) == ["dataset:digits", "model:mlp"] and run.job_type == "train"  # no solver stage
    from safetensors import safe_open

    with safe_open(str(run_dir / "model.safetensors"), "pt") as f:
        key = f.metadata()["model_key"]
    kind, meta = artifacts[f"model-mlp-digits-{key[:12]}"]
    assert kind == "model" and meta["model_key"] == key and meta["n_train"] == 200
    assert meta["config"]["model"]["hidden"] == 32 and meta["config"]["trainer"]["epochs"] == 1


def test_multirun_groups_by_sweep_names_by_swept_overrides(tmp_path):
    r = run_cli(["-m", *SMALL, "stages=[train,fit,pairwise]", "query.n=4", "solver=identity,ekfac"], tmp_path,
                env=wandb_env(tmp_path))
    assert r.returncode == 0, r.stderr
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    models = []
    for job, solver in (("0", "identity"), ("1", "ekfac")):
        run, artifacts = offline_run(sweep / job)
        assert run.run_group == f"{sweep.parent.name}/{sweep.name}" and re.fullmatch(DATE_TIME, run.run_group)
        assert run.display_name == f"solver={solver}"  # what tells the sweep's jobs apart
        assert list(run.tags) == ["dataset:digits", "model:mlp", f"solver:{solver}"] and run.job_type == solver
        kind, meta = artifacts[f"pairwise-scores-{solver}-{run.run_id}"]  # one artifact per run
        assert kind == "scores" and meta["solver"] == solver and meta["dampings"] == [0.0 if job == "0" else 1e-3]
        assert (meta["dataset"], meta["model"], meta["n_train"], meta["n_query"]) == ("digits", "mlp", 200, 4)
        assert meta["group"] == run.run_group and meta["run_name"] == run.display_name
        models += [n for n, (k, _) in artifacts.items() if k == "model"]
    assert len(models) == 2 and models[0] == models[1]  # job 1 reuses job 0's cached model: the same artifact


def test_missing_wandb_is_one_line_before_anything_runs(tmp_path):
    """wandb not importable (simulated: ``sys.modules['wandb'] = None``): one line naming the fix, exit 2."""
    script = "import sys; sys.modules['wandb'] = None; from influencelab.cli import main; main()"
    env = {**os.environ, **wandb_env(tmp_path), "INFLUENCELAB_CACHE": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    r = subprocess.run([sys.executable, "-c", script, *SMALL], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    line = one_line_error(r)
    assert "wandb" in line and "pip install wandb" in line and "logger=none" in line
    assert not (tmp_path / "cache").exists() and not list(tmp_path.rglob("metrics.json"))
    assert not list(tmp_path.rglob("offline-run-*"))


def test_online_without_login_stops_the_sweep_before_any_job(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    env = {**wandb_env(tmp_path), "WANDB_MODE": "online", "NETRC": str(tmp_path / "no-netrc")}
    r = run_cli(["-m", "seed=0,1", *SMALL], tmp_path, env=env)
    line = one_line_error(r)
    assert "WANDB_MODE=online" in line and "wandb login" in line and "WANDB_MODE=offline" in line
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob("multirun/*/*/0"))


def test_tracker_checks_wandb_up_front(tmp_path, monkeypatch):
    """In process: the same checks, each way out of them, and W&B off (no check) as before."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_logged_in()
    with pytest.raises(ConfigError, match=r"logger.mode='?online'? needs a W&B login.*wandb login.*logger.mode=offline"):
        Tracker(mode="online")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    Tracker(mode="online")  # a login (nothing is contacted)
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    Tracker(mode="online")
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        Tracker()
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ConfigError, match="logger.tags"):
        Tracker(tags=["x" * 65])
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="pip install wandb.*logger=none"):
        Tracker()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    Tracker()  # W&B off: wandb is not needed
    monkeypatch.delenv("WANDB_MODE")
    Tracker(mode="disabled"), Tracker(backend="none")


def test_run_names_and_groups():
    assert run_group("multirun/2026-12-04/18-30-00") == "2026-12-04/18-30-00"
    assert run_group("/18-30-00") == "18-30-00"
    ov = ["solver=lissa", "+score.ensemble=2", "logger=wandb", "logger.mode=offline", "paths.cache=/c", "seed=1"]
    assert run_name(ov, "3", keys={"solver", "score.ensemble", "logger"}) == "solver=lissa,score.ensemble=2"
    assert run_name(ov, "3") == "solver=lissa,score.ensemble=2,seed=1"
    assert run_name(ov, "3", exclude={"seed"}) == "solver=lissa,score.ensemble=2"
    assert run_name(["logger=none"], "3") == "3"
    long = run_name([f"k{i}=v" for i in range(60)], "3")
    assert len(long) == MAX_NAME and long.endswith("…")

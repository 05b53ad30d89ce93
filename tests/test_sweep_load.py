"""The sweep machinery under load (issue 32 item 5): ``benchmarks/sweep_load.py`` on 12 jobs over 2 joblib workers
sharing one cache, worker processes SIGKILLed mid-job and the multirun rerun until it finishes: no lost job, every
job's metrics and score files bit-equal to a serial run's, the cache equal to the serial run's, no temporary or
half-written file left (slow). And, fast: the temporary file of a write killed midway (a real SIGKILL) is found by
its writer's pid and removed by the next write of that file or the next process opening the cache, never while its
writer lives."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from influencelab import files
from influencelab.cache import Cache

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep_load.py"

# a child that rewrites one big file atomically, over and over: killed, it leaves its temp file
WRITER = """
import sys
from influencelab.files import atomic_write_bytes
data = bytes(16 << 20)
print("ready", flush=True)
while True:
    atomic_write_bytes(sys.argv[1], data)
"""


def killed_mid_write(target: Path, tries: int = 20) -> Path:
    """SIGKILL a process while it writes ``target`` (once its temp file exists); the temp file it left."""
    for _ in range(tries):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        t0 = time.time()
        while not list(target.parent.glob(f".{target.name}.*.tmp")) and time.time() - t0 < 60:
            time.sleep(0.001)
        p.send_signal(signal.SIGKILL)
        p.wait()
        left = list(target.parent.glob(f".{target.name}.*.tmp"))
        if left:  # (else it was killed between two writes: again)
            (tmp,) = left
            assert f"-{p.pid}." in tmp.name, tmp.name  # the temp file names its writer
            return tmp
    pytest.fail("never caught the writer mid-write")


def test_a_killed_writes_temp_file_is_removed_once_its_writer_is_gone(tmp_path):
    cache = tmp_path / "cache"
    target = cache / "models" / "k.safetensors"
    tmp = killed_mid_write(target)
    assert not target.exists() or target.stat().st_size == 16 << 20  # never a part under the final name
    # a live writer's temp file (this process's, named as atomic_write_bytes names it) is never touched
    live = target.parent / f".other.safetensors.{files._owner()}.abc123{files.TEMP_SUFFIX}"
    live.write_bytes(b"partial")
    assert files.stale_temp(tmp) and not files.stale_temp(live)
    # the same dead writer's temp file beside a run's output (a copy: its name and bytes)
    out = tmp_path / "run" / "k.safetensors"
    out.parent.mkdir()
    dead = out.parent / tmp.name
    dead.write_bytes(tmp.read_bytes()[:1024])
    # the next process opening the cache sweeps it (once per process and root)
    Cache(cache)
    assert not tmp.exists() and live.exists()
    # and the next write of the same file removes one left by an earlier killed write of it
    files.atomic_write_bytes(out, b"whole")
    assert not dead.exists() and out.read_bytes() == b"whole"
    files.atomic_write_bytes(target, b"whole")
    assert live.exists() and not list(target.parent.glob(".k.safetensors.*"))
    assert files.remove_stale_temps(target.parent) == [] and live.exists()
    # written with the umask's modes, not mkstemp's 0600 (a cache shared between users)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_old_temp_file_of_an_unknown_writer_is_stale(tmp_path):
    old = tmp_path / ".x.json.otherhost-1.zz.tmp"
    old.write_text("{")
    assert not files.stale_temp(old)  # another host's pid says nothing here: kept while young
    t = time.time() - files.STALE_TEMP_S - 60
    os.utime(old, (t, t))
    assert files.stale_temp(old) and files.remove_stale_temps(tmp_path) == [old] and not old.exists()


@pytest.mark.slow
def test_sweep_with_killed_workers_equals_a_serial_run(tmp_path):
    out = tmp_path / "sweep_load.csv"
    r = subprocess.run([sys.executable, str(BENCH), "--seeds", "3", "--solvers", "ekfac", "--kills", "2",
                        "--write-kills", "0.5",
                        "--workdir", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    (row,) = list(csv.DictReader(out.open()))
    assert row["jobs"] == "12" and row["workers"] == "2"
    assert row["kills"] == "2" and len(row["killed_jobs"].split()) == 2
    # each kill broke the pool: the sweep stopped with jobs unfinished or never started, and was rerun
    assert int(row["requeues"]) >= 2
    assert int(row["jobs_requeued_unfinished"]) + int(row["jobs_missing_after_kills"]) >= 2
    for k in ("report_misses", "lost_jobs", "metric_mismatches", "score_file_mismatches", "cache_mismatches", "stray_files",
              "serial_stray_files"):
        assert row[k] == "0", (k, r.stdout[-4000:])
    rounds = list(csv.DictReader(out.with_name("sweep_load_rounds.csv").open()))
    assert [x["rc"] for x in rounds][-1] == "0" and all(x["rc"] != "0" for x in rounds[:-1])
    assert rounds[-1]["ok_after"] == "12"
    # the kills left temp files (at least the one aimed mid-write); the next invocation cleared them
    assert int(row["temp_files_left_by_kills"]) >= 1 and rounds[-1]["temp_files_after"] == "0"


def test_jobs_a_stopped_sweep_never_started_are_listed(tmp_path):
    """A SIGKILLed joblib worker stops the whole pool: the jobs not yet launched have no directory. load_sweep
    (and so influencelab-report) counts the multirun's jobs from its multirun.yaml and lists those as unfinished."""
    import json

    from omegaconf import OmegaConf

    import influencelab
    from influencelab.sweeps import NEVER_STARTED, launched_jobs, never_started

    basic = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    OmegaConf.save({"hydra": {"sweeper": {"_target_": basic, "params": {"c": "5,6"}},
                              "overrides": {"task": ["a=1,2,3", "b=x", "stages=[train]"]}}},
                   tmp_path / "multirun.yaml")
    assert launched_jobs(tmp_path) == 6
    for job in ("0", "1", "3"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "config.yaml").write_text("stages: [train]\n")
        (tmp_path / job / "metrics.json").write_text(json.dumps({"time/train_s": 1.0, "train/test_accuracy": 0.5}))
    assert never_started(tmp_path) == [tmp_path / j for j in ("2", "4", "5")]
    df = influencelab.load_sweep(tmp_path, by_damping=False, missing=None)
    assert df["job"].tolist() == ["0", "1", "2", "3", "4", "5"]
    assert df["error"].tolist() == [None, None, NEVER_STARTED, None, NEVER_STARTED, NEVER_STARTED]
    # another sweeper (its own job count), or none: nothing is guessed
    OmegaConf.save({"hydra": {"sweeper": {"_target_": "hydra_plugins.optuna.OptunaSweeper"},
                              "overrides": {"task": ["a=1,2,3"]}}}, tmp_path / "multirun.yaml")
    assert launched_jobs(tmp_path) is None and never_started(tmp_path) == []
    (tmp_path / "multirun.yaml").unlink()
    assert influencelab.load_sweep(tmp_path, by_damping=False)["job"].tolist() == ["0", "1", "3"]

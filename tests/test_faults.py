"""Faults a user's own machine and data bring (issue 32), injected for real where the machine allows: a full disk
(a size-limited tmpfs), a file size limit (RLIMIT_FSIZE: real EFBIG), a read-only file system, a file where a
directory belongs, truncated / bit-flipped / other-version files, non-finite data, a blown-up training, overflowing
curvature and scores. Each ends in one line naming the cause and the fix (exit 2 from the CLI), nothing
half-written is trusted, and a rerun after the fix equals a clean run."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

import influencelab
from conftest import make_config, run_cli
from influencelab import Attributor
from influencelab.cache import Cache
from influencelab.errors import (
    CorruptFileError,
    FileFaultError,
    InfluenceLabError,
    NonFiniteError,
    SolverDivergedError,
    TrainingDivergedError,
)
from influencelab.files import FORMAT_KEY, human_bytes, read_tensors, tensors_bytes

TINY = ["dataset.subset=200", "model=linear", "trainer.epochs=1"]


def one_line_error(stderr: str) -> str:
    """The CLI's error: exactly one ``error:`` line and no traceback."""
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@contextmanager
def tmpfs(path: Path, size: str, *options: str):
    """A real size-limited file system at ``path`` (tmpfs, needs root); skips where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root")
    opts = ",".join([f"size={size}", *options])
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(root: Path) -> Path:
    """Fill the file system of ``root`` to the last byte (a real full disk); returns the filler to delete."""
    filler = root / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 1 << 12, 1 << 8, 1):  # down to the last byte
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


# -- writes: full disk, file size limit, read-only, a file where a directory belongs, permissions -------------------
def test_full_disk_under_the_cache_is_one_line_and_a_rerun_equals_a_clean_run(tmp_path):
    """The CLI with its cache on a full file system: one line (which file, how much was needed, how much is free,
    the fix), exit 2, no entry or temp file left; once there is room the rerun's model equals a clean run's."""
    with tmpfs(tmp_path / "disk", "64k") as disk:
        filler = fill(disk)
        cache = disk / "cache"
        r = run_cli([*TINY, "stages=[train]", f"paths.cache={cache}", "hydra.run.dir=run1"], tmp_path)
        assert r.returncode == 2
        line = one_line_error(r.stderr)
        assert f"cannot write {cache}/models/" in line and "no space left on device" in line
        assert "needed" in line and "free" in line and "paths.cache" in line
        assert not list(cache.rglob("*.safetensors")) and not list(cache.rglob("*.json")) and not temp_files(disk)
        filler.unlink()  # the fix: room on the disk
        from influencelab.cli import run

        rerun = run(make_config([*TINY, "stages=[train]"], cache), tmp_path / "run2")
        clean = run(make_config([*TINY, "stages=[train]"], tmp_path / "clean"), tmp_path / "run3")
    assert not rerun["train/cached"] and rerun["train/test_accuracy"] == clean["train/test_accuracy"]
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("run2", "run3"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_file_size_limit_is_one_line_naming_the_limit(tmp_path):
    """RLIMIT_FSIZE in a child process makes writes past it fail with a real EFBIG: one line, no partial entry."""
    script = textwrap.dedent(f"""
        import resource, sys, torch
        from influencelab.cache import Cache
        from influencelab.errors import FileFaultError
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            Cache({str(tmp_path)!r}).put("factors", "k", {{"w": torch.zeros(4096)}}, {{"x": 1}})
        except FileFaultError as e:
            print(e)
            sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    (line,) = r.stdout.splitlines()
    assert f"cannot write {tmp_path}/factors/k.safetensors" in line and "file size limit (ulimit -f)" in line
    assert f"({human_bytes(len(tensors_bytes({'w': torch.zeros(4096)})))})" in line  # the file's size
    assert not list(tmp_path.rglob("*.safetensors")) and not temp_files(tmp_path)


def test_a_read_only_cache_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        with pytest.raises(FileFaultError, match="read-only: remount it read-write.*paths.cache") as e:
            Cache(ro / "cache").put("models", "k", {"w": torch.ones(3)}, {})
    assert "\n" not in str(e.value)


def test_a_file_where_the_cache_directory_belongs_is_one_line(tmp_path):
    """``paths.cache`` pointing at a regular file (root ignores permission bits; this fault it cannot ignore)."""
    from influencelab.cli import run

    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    with pytest.raises(FileFaultError) as e:
        run(make_config([*TINY, "stages=[train]"], blocker), tmp_path / "run")
    msg = str(e.value)
    assert "\n" not in msg and f"{blocker} is a file where a directory is expected: move or remove it" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (the read-only file system and the "
                                                "file-for-directory tests cover what root cannot bypass)")
def test_a_cache_without_write_permission_is_one_line(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models").chmod(0o500)
    try:
        with pytest.raises(FileFaultError, match="permission denied: make .* writable"):
            Cache(tmp_path).put("models", "k", {"w": torch.ones(3)}, {})
    finally:
        (tmp_path / "models").chmod(0o700)


# -- reads: truncated, corrupt and other-version files --------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real CLI run (train + self-influence) and copies of its outputs."""
    root = tmp_path_factory.mktemp("faults_run")
    r = run_cli([*TINY, "stages=[train,self]", "solver=ekfac", "hydra.run.dir=run"], root)
    assert r.returncode == 0, r.stderr
    run_dir = root / "run"
    return root, run_dir, {p: p.read_bytes() for p in (run_dir / "model.safetensors", run_dir / "metrics.json",
                                                        run_dir / "scores" / "self.safetensors")}


@pytest.mark.parametrize("damage", ["truncate", "flip", "other_version"])
def test_a_damaged_run_output_is_one_line_saying_how_to_regenerate_it(finished_run, damage):
    root, run_dir, good = finished_run
    scores = run_dir / "scores" / "self.safetensors"
    model = run_dir / "model.safetensors"
    try:
        if damage == "truncate":  # what the issue saw: SafetensorError: invalid header length
            scores.write_bytes(good[scores][:200])
            target, cause = scores, "is truncated"
        elif damage == "flip":
            blob = bytearray(good[model])
            blob[-5] ^= 0x10
            model.write_bytes(bytes(blob))
            target, cause = model, "is corrupt (its tensors do not match the checksum"
        else:
            tensors, meta = read_tensors(model)
            save_file(tensors, str(model), metadata={**meta, FORMAT_KEY: "99"})
            target, cause = model, "is written by another version of influencelab (format 99"
        with pytest.raises(CorruptFileError) as e:
            _ = influencelab.load_run(run_dir).self_scores
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{target} {cause}")
        assert "regenerate it: influencelab " in msg and f"hydra.run.dir={run_dir}" in msg
    finally:
        for p, blob in good.items():
            p.write_bytes(blob)


def test_damaged_run_outputs_are_regenerated_by_the_command_the_error_names(finished_run):
    root, run_dir, good = finished_run
    scores, metrics = run_dir / "scores" / "self.safetensors", run_dir / "metrics.json"
    scores.write_bytes(good[scores][: len(good[scores]) // 2])
    metrics.write_bytes(good[metrics][:40])
    with pytest.raises(CorruptFileError, match=f"{metrics} is (truncated|corrupt)") as e:
        influencelab.load_run(run_dir)
    command = shlex.split(str(e.value).split("regenerate it: ", 1)[1])
    assert command[0] == "influencelab"
    r = run_cli(command[1:], root)
    assert r.returncode == 0, r.stderr
    assert f"{metrics} is " in r.stdout + r.stderr and "starting it afresh" in r.stdout + r.stderr
    run = influencelab.load_run(run_dir)
    assert torch.equal(run.self_scores, load_file_bytes(good[scores])["scores"])
    assert run.metrics["train/test_accuracy"] == json.loads(good[metrics])["train/test_accuracy"]
    assert not temp_files(run_dir)


def load_file_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(blob)


# -- cache entries: recomputed with a warning --------------------------------------------------------------------
def tiny_classifier(seed: int = 0, d: int = 6, k: int = 3, n: int = 48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, k)), x, y


@pytest.mark.parametrize("damage", ["flip", "truncate", "other_version"])
def test_a_corrupt_factor_entry_is_recomputed_with_a_warning(tmp_path, caplog, damage):
    model, x, y = tiny_classifier()
    first = Attributor(model, solver="ekfac", cache_dir=tmp_path).fit(TensorDataset(x, y))
    want = first.self_influence()
    (entry,) = (tmp_path / "factors").glob("*.safetensors")
    if damage == "flip":
        blob = bytearray(entry.read_bytes())
        blob[-3] ^= 0x01
        entry.write_bytes(bytes(blob))
    elif damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:100])
    else:
        record = json.loads(entry.with_suffix(".json").read_text())
        entry.with_suffix(".json").write_text(json.dumps({**record, "version": 0}))
    shutil.rmtree(tmp_path / "self")  # (the score chunks would be reused otherwise)
    with caplog.at_level(logging.WARNING):
        again = Attributor(model, solver="ekfac", cache_dir=tmp_path).fit(TensorDataset(x, y))
    assert not again.fit_info.cached
    warned = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert len(warned) == 1 and str(entry.with_suffix("")) in warned[0] and "recomputing" in warned[0]
    torch.testing.assert_close(again.self_influence(), want, rtol=0, atol=0)
    assert Cache(tmp_path).get("factors", entry.stem) is not None  # whole again


# -- numerical health -------------------------------------------------------------------------------------------
def test_training_that_blows_up_stops_in_one_line_and_caches_nothing(tmp_path):
    """SGD with a huge learning rate (the issue: loss ~1e31 reported as success): exit 2 before any model is cached
    or scored, the fix named."""
    r = run_cli([*TINY, "trainer.optimizer=sgd", "trainer.lr=1000", "stages=[train,self]", "hydra.run.dir=run"],
                tmp_path)
    assert r.returncode == 2
    line = one_line_error(r.stderr)
    assert "training diverged: the loss rose from" in line and "lower trainer.lr (now 1000; try trainer.lr=100)" in line
    assert not list((tmp_path / "cache").rglob("*.safetensors")) and not (tmp_path / "run" / "scores").exists()


def test_a_finite_loss_explosion_through_the_api_is_an_error():
    from influencelab.data.base import LabeledData
    from influencelab.train import Trainer

    model, x, y = tiny_classifier(n=64)
    with pytest.raises(TrainingDivergedError, match="rose from .* times; lower trainer.lr"):
        Trainer(epochs=3, optimizer="sgd", lr=500.0, momentum=0.9, batch_size=16, device="cpu").fit(
            model, LabeledData(x, y, num_classes=3))


def test_solver_modules_are_checked_against_the_model_before_training(tmp_path):
    r = run_cli([*TINY, "stages=[train,self]", "solver.modules=re:no_such_layer", "hydra.run.dir=run"], tmp_path)
    assert r.returncode == 2
    line = one_line_error(r.stderr)
    assert "solver.modules='re:no_such_layer' is invalid: selects none of the Linear/Conv2d modules" in line
    assert not (tmp_path / "cache" / "models").exists() and "training" not in r.stderr  # nothing trained


@pytest.mark.parametrize("where", ["input", "target"])
def test_non_finite_data_names_the_example(where):
    """The issue saw ``probability tensor contains either inf, nan`` from Fisher sampling instead."""
    model, x, y = tiny_classifier()
    task = None
    if where == "input":
        x[17, 2] = float("nan")
    else:
        from influencelab import RegressionTask

        task, model = RegressionTask(), nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
        y = torch.randn(len(x), 1)
        y[17, 0] = float("inf")
    with pytest.raises(NonFiniteError) as e:
        Attributor(model, task=task, solver="ekfac").fit(TensorDataset(x, y))
    msg = str(e.value)
    assert "\n" not in msg and f"example at position 17 (index 17) has a non-finite {where}" in msg
    assert "repair or remove" in msg


def test_a_model_with_nan_weights_is_named_before_fitting():
    model, x, y = tiny_classifier()
    with torch.no_grad():
        model[2].bias[1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"parameter 2.bias holds 1 NaN/inf values"):
        Attributor(model, solver="ekfac").fit(TensorDataset(x, y))


def test_outputs_that_overflow_end_in_one_line_not_a_sampling_error():
    model, x, y = tiny_classifier()
    with torch.no_grad():
        model[2].weight.fill_(3e38)  # finite weights; the logits overflow to inf (the softmax to NaN)
    with pytest.raises(NonFiniteError, match="the model's outputs overflow on the training data; check the model"):
        Attributor(model, solver="ekfac").fit(TensorDataset(x, y))


def test_absurd_curvature_warns_and_scores_overflowing_float32_are_an_error(caplog):
    """Inputs of size 1e20: EK-FAC's input covariance (~1e40) overflows float32 (an error naming the factor); the
    identity solver's self-influence g·g ~ 1e40 overflows float32 (an error naming the fix) but not float64."""
    _, x, y = tiny_classifier()
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    huge = TensorDataset(x * 1e20, y)
    with pytest.raises(NonFiniteError, match="curvature factors with NaN/inf values.*solver.dtype=float64"):
        Attributor(model, solver="ekfac").fit(huge)
    with caplog.at_level(logging.WARNING):
        Attributor(model, solver="ekfac").fit(TensorDataset(x * 1e12, y))
    assert any("absurdly large" in r.getMessage() for r in caplog.records)
    with pytest.raises(SolverDivergedError, match="NaN/inf self-influence scores.*solver.dtype=float64"):
        Attributor(model, solver="identity").fit(huge).self_influence()
    s = Attributor(model, solver="identity", dtype="float64").fit(huge).self_influence()
    assert torch.isfinite(s).all() and s.max() > 1e38


def test_every_fault_error_is_an_influencelab_error():
    """The CLI prints these in one line with exit 2 (it catches InfluenceLabError)."""
    for cls in (FileFaultError, CorruptFileError, NonFiniteError, TrainingDivergedError):
        assert issubclass(cls, InfluenceLabError)


def test_a_corrupt_report_csv_is_one_line_naming_the_command_that_rewrites_it(finished_run, tmp_path):
    """influencelab-report FILE.csv (a report redrawn from its CSV) on a damaged report.csv: one line, the file,
    the cause and the command; and the report's CSVs are written whole (no temporary file left beside them)."""
    from influencelab.sweeps import load_sweep

    root, run_dir, _ = finished_run
    sweep = tmp_path / "sweep"
    shutil.copytree(run_dir, sweep / "0")
    r = subprocess.run([sys.executable, "-m", "influencelab.report", str(sweep)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (sweep / "report.csv").exists() and not list(sweep.glob("*.tmp")) and not list(sweep.glob(".*.tmp"))
    good = (sweep / "report.csv").read_text()
    (sweep / "report.csv").write_text(good.splitlines()[0] + '\n"0,unterminated\n')
    with pytest.raises(CorruptFileError) as e:
        load_sweep(sweep / "report.csv")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{sweep / 'report.csv'} is corrupt")
    assert f"regenerate it: influencelab-report {sweep}" in msg


def test_safetensors_are_streamed_without_a_copy_of_the_tensors(tmp_path):
    """save_tensors writes a file safetensors itself reads back exactly (dtypes, an empty and a non-contiguous
    tensor), returns the file's SHA-256, and never holds the serialised file in memory: its Python allocations
    peak far below the 40 MB tensor, where the library's ``save`` (tensors_bytes) builds all 40 MB as bytes."""
    import hashlib
    import tracemalloc

    from safetensors.torch import load_file

    from influencelab.files import save_tensors

    ts = {"big": torch.randn(5_000_000, dtype=torch.float64), "t": torch.randn(4, 3).T, "e": torch.zeros(0),
          "h": torch.randn(7, dtype=torch.bfloat16), "i": torch.arange(5, dtype=torch.int32),
          "m": torch.ones(2, 2, dtype=torch.bool)}
    path = tmp_path / "x.safetensors"
    tracemalloc.start()
    digest = save_tensors(path, ts, {"k": "v"})
    _, streamed = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    tensors_bytes(ts)
    _, library = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert streamed < 4e6 < 40e6 <= library
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    got = load_file(path)
    assert set(got) == set(ts) and all(torch.equal(got[k], v) for k, v in ts.items())
    back, meta = read_tensors(path)
    assert meta["k"] == "v" and torch.equal(back["big"], ts["big"])

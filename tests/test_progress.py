"""Progress off a terminal (log lines with count/total, rate and ETA every N seconds; none when N=0; a tqdm bar on
a terminal) and the SLURM launcher's requeue on timeout (``max_num_timeout``), with site/local.yaml winning."""

from __future__ import annotations

import io
import logging
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from influencelab import progress as progress_mod
from influencelab.cli import CONFIG_DIR
from influencelab.progress import LogProgress, progress

LINE = re.compile(r"^loop: (\d+)/6 \(\d+%\), [\d.]+ (it/s|s/it), elapsed \d\d:\d\d, ETA \d\d:\d\d$")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def not_a_tty(monkeypatch) -> io.StringIO:
    """stderr is a plain (non-terminal) stream; returned so a test can check that no bar was drawn on it."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv(progress_mod.ENV, raising=False)
    return stream


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "influencelab"]


def test_log_lines_off_a_terminal(not_a_tty, monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "INTERVAL_S", 0.01)
    caplog.set_level(logging.INFO, logger="influencelab")
    threads = threading.active_count()
    bar = progress(range(6), desc="loop")
    assert isinstance(bar, LogProgress)
    assert threading.active_count() == threads  # no monitor thread
    for _ in bar:
        time.sleep(0.02)
    lines = _lines(caplog)
    progress_lines = [s for s in lines if LINE.match(s)]
    assert len(progress_lines) >= 3, lines
    counts = [int(LINE.match(s).group(1)) for s in progress_lines]
    assert counts == sorted(counts) and 1 <= counts[0] < 6
    assert re.fullmatch(r"loop: 6/6 \(100%\), [\d.]+ (it/s|s/it), elapsed \d\d:\d\d, done", lines[-1]), lines
    assert sum(s.endswith(", done") for s in lines) == 1, lines
    assert not_a_tty.getvalue() == ""  # nothing drawn on stderr


def test_a_loop_left_early_says_stopped(not_a_tty, monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "INTERVAL_S", 0.01)
    caplog.set_level(logging.INFO, logger="influencelab")
    bar = progress(range(10), desc="loop")
    for i in bar:
        time.sleep(0.02)
        if i == 3:
            break
    bar.close()
    lines = _lines(caplog)
    assert re.fullmatch(r"loop: \d/10 \(\d+%\), .*, stopped", lines[-1]), lines


def test_env_var_sets_the_interval_and_unknown_totals(not_a_tty, monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "INTERVAL_S", 3600.0)
    monkeypatch.setenv(progress_mod.ENV, "0.01")
    caplog.set_level(logging.INFO, logger="influencelab")
    for _ in progress((i for i in range(4)), desc="gen"):  # no len(): count and rate, no ETA
        time.sleep(0.02)
    lines = _lines(caplog)
    assert any(re.fullmatch(r"gen: \d it, [\d.]+ it/s, elapsed \d\d:\d\d", s) for s in lines), lines
    assert lines[-1].startswith("gen: 4 it, ") and lines[-1].endswith(", done")


def test_short_loops_stay_silent(not_a_tty, caplog):
    caplog.set_level(logging.INFO, logger="influencelab")
    for _ in progress(range(1000), desc="quick"):  # default 30 s: far more than this loop takes
        pass
    assert _lines(caplog) == []


def test_interval_zero_disables(not_a_tty, monkeypatch, caplog):
    monkeypatch.setenv(progress_mod.ENV, "0")
    caplog.set_level(logging.INFO, logger="influencelab")
    bar = progress(range(5), desc="off")
    assert not isinstance(bar, LogProgress) and bar.disable
    for _ in bar:
        time.sleep(0.01)
    assert _lines(caplog) == [] and not_a_tty.getvalue() == ""


def test_bad_env_value_falls_back_with_a_warning(not_a_tty, monkeypatch, caplog):
    monkeypatch.setenv(progress_mod.ENV, "soon")
    monkeypatch.setattr(progress_mod, "_warned", set())
    caplog.set_level(logging.INFO, logger="influencelab")
    assert progress_mod.interval_s() == progress_mod.INTERVAL_S
    assert any("INFLUENCELAB_PROGRESS_S" in s for s in _lines(caplog))


def test_terminal_keeps_the_tqdm_bar(monkeypatch, caplog):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setenv(progress_mod.ENV, "0.01")
    caplog.set_level(logging.INFO, logger="influencelab")
    bar = progress(range(3), desc="bar")
    assert isinstance(bar, progress_mod.tqdm) and not isinstance(bar, LogProgress)
    assert not bar.disable and bar.leave is False
    for _ in bar:
        pass
    assert "bar:" in tty.getvalue()  # drawn on the terminal ...
    assert _lines(caplog) == []  # ... and not logged


def _launcher(config_dir: str | Path, *overrides: str):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=none", "hydra/launcher=slurm", *overrides],
                      return_hydra_config=True)
    return cfg.hydra.launcher


def test_slurm_launcher_requeues_on_timeout():
    launcher = _launcher(CONFIG_DIR)
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.max_num_timeout == 3 and launcher.timeout_min == 240
    assert _launcher(CONFIG_DIR, "hydra.launcher.max_num_timeout=0").max_num_timeout == 0


def test_slurm_site_local_overrides_the_launcher_file(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONFIG_DIR, conf)
    (conf / "hydra/launcher/site/local.yaml").write_text("partition: gpu\ntimeout_min: 999\nmax_num_timeout: 1\n")
    launcher = _launcher(conf)
    assert (launcher.partition, launcher.timeout_min, launcher.max_num_timeout) == ("gpu", 999, 1)


HEARTBEAT = re.compile(r"^step: running for \d\d:\d\d(; (.+) for \d\d:\d\d)?$")


def test_heartbeat_fills_silence_names_the_activity_and_stops(not_a_tty, caplog):
    """Nothing logged for the interval: a line naming the step and the innermost activity; none after exit."""
    from influencelab.progress import activity, heartbeat

    caplog.set_level(logging.INFO, logger="influencelab")
    threads = threading.active_count()
    with heartbeat("step", interval=0.05):
        with activity("reference cg at damping 0.001"):
            time.sleep(0.4)
        time.sleep(0.15)
    assert threading.active_count() == threads  # its thread is gone
    lines = [s for s in _lines(caplog) if HEARTBEAT.match(s)]
    assert len(lines) >= 4, _lines(caplog)
    assert HEARTBEAT.match(lines[0]).group(2) == "reference cg at damping 0.001"
    assert HEARTBEAT.match(lines[-1]).group(2) is None  # the activity ended
    n = len(_lines(caplog))
    time.sleep(0.15)
    assert len(_lines(caplog)) == n


def test_heartbeat_is_quiet_while_the_log_is_not(not_a_tty, caplog):
    """Other lines at a shorter interval than the heartbeat's: it adds none (a child logger counts too)."""
    from influencelab.progress import heartbeat

    caplog.set_level(logging.INFO, logger="influencelab")
    child = logging.getLogger("influencelab.solvers.cg")
    with heartbeat("step", interval=0.5):
        for i in range(8):
            child.info("working %d", i)
            time.sleep(0.05)
    assert not [s for s in _lines(caplog) if s.startswith("step:")], _lines(caplog)


def test_cg_iterations_report_progress(not_a_tty, monkeypatch, caplog):
    """CG logs its iteration count off a terminal (every iteration here: interval ~0), and a last line."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from influencelab import Attributor
    from influencelab.solvers.cg import CG

    monkeypatch.setenv(progress_mod.ENV, "1e-9")
    caplog.set_level(logging.INFO, logger="influencelab")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    attr = Attributor(net, solver=CG(damping=1e-2, tol=1e-10, max_iter=50, dtype="float64")).fit(TensorDataset(x, y))
    attr.precondition(attr.query_gradients(TensorDataset(x[:2], y[:2])))
    (conv,) = attr.solver.diagnostics().values()
    iters = conv.iterations
    lines = [s for s in _lines(caplog) if s.startswith("cg at damping 0.01: ")]
    counts = [int(re.match(r"cg at damping 0\.01: (\d+) iter", s).group(1)) for s in lines]
    assert counts and counts == sorted(counts) and counts[-1] == iters > 1, _lines(caplog)
    assert lines[-1].endswith("done")


def test_every_stage_time_in_the_summary_and_silent_stages_heartbeat(run_pipeline, monkeypatch, caplog):
    """A stage that logs nothing for longer than the interval gets heartbeat lines naming it; the run summary's
    time line lists every stage, those that log no time of their own too."""
    from influencelab.cli import summary
    from influencelab.registry import STAGES, Stage

    def silent(ctx) -> None:
        time.sleep(0.5)

    monkeypatch.setitem(STAGES, "silent", Stage("silent", silent))
    monkeypatch.setenv(progress_mod.ENV, "0.1")
    caplog.set_level(logging.INFO, logger="influencelab")
    run_dir, metrics = run_pipeline(["dataset.subset=100", "model=linear", "trainer.epochs=1",
                                     "stages=[train,silent]"])
    assert len([s for s in _lines(caplog) if s.startswith("stage silent: running for ")]) >= 2, _lines(caplog)
    assert metrics["time/silent_s"] >= 0.5
    (line,) = [s for s in summary(metrics, run_dir).splitlines() if s.startswith("time: ")]
    assert re.fullmatch(r"time: train [\d.]+s, silent [\d.]+s", line), line

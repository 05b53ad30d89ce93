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

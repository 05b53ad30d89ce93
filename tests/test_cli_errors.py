"""A misspelt key, group or option on the command line: one line, exit 2, a did-you-mean from the names that exist,
naming the right group, and nothing written (no outputs/, no multirun/ folder), for a run and for a multirun.

The CLI's entry point runs in-process (``influencelab.cli.main`` with ``sys.argv`` set, in an empty working
directory); one test runs the real command to check the exit status and stderr of a process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from influencelab import cli
from influencelab.errors import ConfigError
from influencelab.keys import UnknownKeyError
from influencelab.preflight import check_command_line

SMALL = ["logger=none", "dataset.subset=200", "model=mlp", "trainer.epochs=1"]

#: (command line, what the one line must say)
TYPOS = [
    (["datset=digits"], ["datset is not a config group", "did you mean dataset=digits?"]),
    (["datset.subset=100"], ["did you mean dataset.subset=100?"]),
    (["trainer.epoch=1"], ["trainer.epoch is not a key of trainer", "did you mean trainer.epochs=1?"]),
    # the key added with +: the hint names the trainer (it named ~solver.epoch)
    (["+trainer.epoch=1"], ["trainer.epoch is not a key of trainer", "did you mean trainer.epochs?",
                            "~trainer.epoch"]),
    (["~trainer.epoch"], ["did you mean trainer.epochs?"]),
    (["solver=lisa"], ["solver=lisa is not an option of solver", "did you mean solver=lissa?"]),
    (["experiment=mislabl"], ["did you mean experiment=mislabel?"]),
    (["solver=lissa", "solver.dept=10"], ["solver.dept is not a key of solver (solver=lissa)",
                                          "did you mean solver.depth=10?"]),
    (["query.nn=3"], ["query.nn is not a key of query", "did you mean query.n?"]),
    (["+lds.n_subset=3"], ["lds.n_subset is not a key of lds", "did you mean lds.n_subsets?"]),
    (["+paths.cach=x"], ["paths.cach is not a key of paths", "did you mean paths.cache?"]),
    (["+sed=3"], ["+sed adds a key nothing reads", "did you mean seed=3?"]),
    (["hydra/launchr=parallel"], ["did you mean hydra/launcher=parallel?"]),
    (["-m", "solver=ekfac,lisa"], ["did you mean solver=lissa?"]),
    (["-m", "trainer.epoch=1,2"], ["did you mean trainer.epochs=1,2?"]),
    (["-m", "+trainer.epoch=1,2"], ["trainer.epoch is not a key of trainer", "did you mean trainer.epochs?"]),
    # a key only one of the swept solvers has stops the sweep before its first job
    (["-m", "solver=lissa,ekfac", "solver.depth=10"], ["solver.depth is not a key of solver (solver=ekfac)"]),
]


def run_main(argv: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["influencelab", *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("argv", "says"), TYPOS, ids=[" ".join(argv) for argv, _ in TYPOS])
def test_typo_is_one_line_exit_2_with_did_you_mean_and_nothing_written(argv, says, tmp_path, monkeypatch, capsys):
    code, err = run_main([*argv, *SMALL, f"paths.cache={tmp_path / 'cache'}"], tmp_path, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for s in says:
        assert s in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "a rejected config wrote something"


def test_no_suggestion_without_a_close_name_but_the_names_listed():
    with pytest.raises(UnknownKeyError) as e:
        check_command_line(["solver=zzzz", *SMALL])
    assert "did you mean" not in str(e.value) and "lissa" in str(e.value) and "ekfac" in str(e.value)


def test_bad_values_are_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """A bad value of a single run (caught by the run's own validation) writes nothing either."""
    for argv, says in ((["stages=[trian]"], "stages="), (["trainer.epochs=0"], "trainer.epochs=0"),
                       (["solver.damping=1,2"], "add -m"), (["+trainer.epochs=2"], "without the +")):
        code, err = run_main([*SMALL, *argv], tmp_path, monkeypatch, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert list(tmp_path.iterdir()) == []


def test_sweep_with_some_bad_values_is_left_to_its_jobs_but_all_bad_is_rejected():
    """A bad value stops its own job (the sweep records it); a sweep where every job is bad does not start."""
    check_command_line(["-m", "solver.damping=-1,1e-3", "stages=[train,fit]", *SMALL])  # job 0 alone is bad
    with pytest.raises(ConfigError, match="every job of the sweep is invalid: stages="):
        check_command_line(["-m", "stages=[trian]", "seed=1,2", *SMALL])


def test_good_command_lines_pass(tmp_path):
    check_command_line([*SMALL, "stages=[train,fit,pairwise]", "solver=lissa", "solver.depth=10"])
    check_command_line(["-m", "solver=lissa,ekfac", "solver.damping=1e-3,1e-2", "stages=[fit,pairwise]", *SMALL])
    check_command_line(["--cfg", "job", *SMALL])
    check_command_line(["experiment=quickstart", "logger=none", "++trainer.device=cpu"])


def test_real_command_exit_status(tmp_path):
    from conftest import run_cli

    r = run_cli(["datset=digits", "logger=none"], tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: datset is not a config group or key: did you mean dataset=digits? "
                               "the groups: dataset, experiment, hydra, logger, model, solver, task, trainer;")
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()

"""Every option of every config group composes and passes the project's validation, without reading any data.

Adding a solver, a dataset, a model, a task or a study is one module plus one YAML (README, "Layout"); this test
picks the new YAML up by itself: for each ``conf/<group>/<option>.yaml`` of the groups below it composes the app's
config with ``<group>=<option>`` through Hydra's compose API (as ``influencelab`` does: the schema'd sections are
type-checked there) and builds the run's :class:`~influencelab.pipeline.Context`, which validates every section the
stages read, builds the dataset spec, trainer, task, model and solver and runs the stages' prechecks, all before any
data is read; the logger is built as ``influencelab`` builds it. The data is never loaded (checked).

An option that is only valid beside other choices gets them from :data:`COMPANIONS` (a regression task needs a
dataset with continuous targets); pretrained weights are switched off (no network in the tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import influencelab.cli  # noqa: F401 (as the app: loads the stage modules and registers the section schemas)
from influencelab.compose import CONFIG_DIR, build
from influencelab.pipeline import Context
from influencelab.tracking import Tracker

GROUPS = ("dataset", "model", "solver", "trainer", "logger", "task", "experiment")
#: ``(group, option)`` -> the other choices it needs to be a valid run (``{root}``: a small image folder)
COMPANIONS: dict[tuple[str, str], list[str]] = {
    ("task", "regression"): ["dataset=diabetes", "model=mlp"],
    ("dataset", "diabetes"): ["task=regression", "model=mlp"],
    ("dataset", "image_folder"): ["dataset.root={root}", "dataset.image_size=16"],
    ("model", "vit_b16"): ["dataset.image_size=16"],  # the patch size (digits are upscaled)
    ("solver", "tracin"): ["trainer.checkpoints=2"],  # (the training checkpoints it sums over)
    ("solver", "exact"): ["model=mlp"],  # (a dense P x P matrix: the default CNN's 13,706 parameters are refused)
}


def options() -> list[tuple[str, str]]:
    conf = Path(CONFIG_DIR)
    return [(g, p.stem) for g in GROUPS if (conf / g).is_dir() for p in sorted((conf / g).glob("*.yaml"))]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_every_group_has_options():
    """The groups exist and hold options (a renamed directory would silently test nothing)."""
    found = {g for g, _ in options()}
    assert {"dataset", "model", "solver", "trainer", "logger", "experiment"} <= found


@pytest.mark.parametrize(("group", "option"), options(), ids=lambda v: str(v))
def test_config_group_option_composes_and_validates(group, option, tmp_path):
    from test_image_folder import write_folder

    root = write_folder(tmp_path / "images") if (group, option) == ("dataset", "image_folder") else None
    extra = [o.format(root=root) for o in COMPANIONS.get((group, option), [])]
    # the option's own stages for a preset; otherwise fit too, so that the solver is built and checked
    stages = [] if group == "experiment" else ["stages=[train,fit]"]
    quiet = [] if group == "logger" else ["logger=none"]
    overrides = [f"{group}={option}", *extra, *stages, *quiet, f"paths.cache={tmp_path / 'cache'}",
                 f"paths.data={tmp_path / 'data'}"]
    cfg = compose_config(overrides)
    if cfg.model.get("pretrained"):
        cfg = compose_config([*overrides, "model.pretrained=false"])
    build(cfg.logger)
    ctx = Context(cfg, tmp_path / "run", Tracker(backend="none"))
    assert "data" not in vars(ctx), "validation read the data"
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()

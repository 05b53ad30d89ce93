"""Foundation: training, caching, run outputs, load_run, W&B offline logging, and bad-input handling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import influencelab
from conftest import make_config, run_cli
from influencelab.cache import Cache
from influencelab.pipeline import Context

QUICK = ["trainer.epochs=2", "stages=[train]"]


def test_quickstart_cnn_reaches_95_percent_on_clean_digits(run_pipeline):
    """The quickstart's CNN and schedule, clean labels: >= 0.95 test accuracy on the 360 test digits."""
    _, m = run_pipeline(["experiment=quickstart", "dataset.label_noise=0.0", "stages=[train]"])
    assert m["train/test_accuracy"] >= 0.95
    assert m["train/n_flipped"] == 0


def test_run_dir_outputs_and_load_run_round_trip(run_pipeline):
    run_dir, m = run_pipeline([*QUICK, "dataset.label_noise=0.2"])
    assert (run_dir / "metrics.json").exists() and (run_dir / "figures" / "training.png").stat().st_size > 0
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["train/test_accuracy"] == m["train/test_accuracy"] and "time/train_s" in on_disk
    run = influencelab.load_run(run_dir)
    assert not run.model.training
    assert run.flipped.sum().item() == round(0.2 * len(run.train)) == m["train/n_flipped"]
    # the loaded model reproduces the run's test accuracy exactly
    with torch.no_grad():
        acc = (run.model(run.test.x).argmax(1) == run.test.targets).double().mean().item()
    assert acc == pytest.approx(m["train/test_accuracy"], abs=1e-9)
    assert run.config.dataset.label_noise == 0.2 and run.pairwise_scores is None


def test_model_cache_reused_and_keyed_by_exactly_its_config(run_pipeline, cache_dir):
    _, m1 = run_pipeline(QUICK, "a")
    _, m2 = run_pipeline([*QUICK, "logger=none", "query.n=5"], "b")  # does not change the model
    assert not m1["train/cached"] and m2["train/cached"]
    assert m2["train/test_accuracy"] == m1["train/test_accuracy"]
    _, m3 = run_pipeline([*QUICK, "trainer.lr=0.002"], "c")  # does
    assert not m3["train/cached"]
    assert len(list((cache_dir / "models").glob("*.safetensors"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "drop_json"])
def test_corrupt_cache_entry_is_rebuilt_not_loaded(run_pipeline, cache_dir, damage):
    _, m1 = run_pipeline(QUICK, "a")
    (entry,) = (cache_dir / "models").glob("*.safetensors")
    blob = bytearray(entry.read_bytes())
    if damage == "truncate":
        entry.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        blob[-10] ^= 0xFF
        entry.write_bytes(bytes(blob))
    else:
        entry.with_suffix(".json").unlink()
    _, m2 = run_pipeline(QUICK, "b")
    assert not m2["train/cached"]  # retrained instead of loading damaged weights
    assert m2["train/test_accuracy"] == pytest.approx(m1["train/test_accuracy"])
    assert Cache(cache_dir).get("models", entry.stem) is not None  # and the entry is whole again


def test_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    """A crash while writing (here: once the bytes are written, before they are synced) leaves neither entry nor
    temp file."""
    import influencelab.files as files_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(files_mod.os, "fsync", boom)
    c = Cache(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        c.put("models", "k", {"w": torch.ones(3)}, {"x": 1})
    assert list((tmp_path / "models").iterdir()) == []
    assert c.get("models", "k") is None


def test_wandb_offline_run_is_written(tmp_path):
    """The one test with W&B on: an offline run directory appears inside the run dir."""
    cfg = make_config([*QUICK, "logger=wandb"], tmp_path / "cache")
    run_dir = tmp_path / "run"
    os.environ["WANDB_MODE"] = "offline"
    try:
        from influencelab.cli import run

        run(cfg, run_dir, "job", "sweep-x")
    finally:
        os.environ["WANDB_MODE"] = "disabled"
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (record,) = runs[0].glob("*.wandb")
    logged = record.read_bytes()  # the training curve as a table and as a line chart, the figure as an image
    for key in (b"training_curve", b"training_curve_plot", b"wandb/lineseries", b"figures/training"):
        assert key in logged, key
    assert (run_dir / "training_curve.csv").read_text().startswith("epoch,loss,train_accuracy")


@pytest.mark.parametrize("override, key", [
    ("dataset.label_noise=1.0", "dataset.label_noise"),
    ("dataset.label_noise=-0.1", "dataset.label_noise"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("trainer.lr=0", "trainer.lr"),
    ("trainer.lr=-1e-3", "trainer.lr"),
    ("dataset.subset=5000", "dataset.subset"),
    ("model=vit_b16", "dataset.image_size"),
    ("dataset.image_size=2", "dataset.image_size"),
    ("trainer.device=cuda", "trainer.device"),
    ("score.ensemble=0", "score.ensemble"),
    ("score.chunk_size=0", "score.chunk_size"),
    ("score.chunk_size=abc", "score.chunk_size"),
    ("score.partition=3/2", "score.partition"),
    ("query.n=0", "query.n"),
    ("+score.chunksize=8", "score.chunksize"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, override, key):
    r = run_cli([override, "trainer.epochs=1" if key != "trainer.epochs" else "seed=0"], tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


@pytest.mark.parametrize("stages, override, key", [
    ("[train,fit,lds]", "lds.n_subsets=1", "lds.n_subsets"),
    ("[train,fit,lds]", "lds.fraction=1.5", "lds.fraction"),
    ("[train,fit,unlearn]", "unlearn.mode=bogus", "unlearn.mode"),
    ("[train,fit,unlearn]", "unlearn.repair_to=truth", "unlearn.repair_to"),
    ("[train,fit,pairwise,loo]", "loo.n_queries=99", "loo.n_queries"),
    ("[train,fit,pairwise,loo]", "loo.retrain=hot", "loo.retrain"),
    ("[train,fit,ihvp]", "ihvp.reference=nope", "ihvp.reference"),
    ("[train,fit,ihvp]", "solver.damping=auto", "solver.damping"),
    ("[train,fit,self,mislabel]", "dataset.label_noise=0", "dataset.label_noise"),
    ("[train,fit,unlearn]", "unlearn.selection=flipped", "unlearn.selection"),
])
def test_stage_keys_are_checked_before_anything_is_read_or_written(tmp_path, stages, override, key):
    """Every selected stage's section is validated up front: one line, exit 2, no cache or W&B files."""
    r = run_cli([f"stages={stages}", override, "trainer.epochs=1", "logger=wandb"], tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], r.stderr
    assert not (tmp_path / "cache").exists()
    assert not list(tmp_path.rglob("wandb"))


def test_unknown_option_gets_hydra_message(tmp_path):
    r = run_cli(["dataset=cifar99"], tmp_path)
    assert r.returncode != 0 and "cifar99" in r.stderr


def test_hydra_full_error_shows_traceback(tmp_path):
    r = run_cli(["trainer.lr=0"], tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "trainer.lr" in r.stderr


def test_multirun_sweep_writes_one_dir_per_job(tmp_path):
    r = run_cli(["-m", "trainer.epochs=1", "seed=0,1", "dataset.subset=300"], tmp_path)
    assert r.returncode == 0, r.stderr
    jobs = sorted(p.parent for p in (tmp_path / "multirun").glob("*/*/*/metrics.json"))
    assert len(jobs) == 2 and jobs[0].parent == jobs[1].parent
    accs = [json.loads((j / "metrics.json").read_text())["train/test_accuracy"] for j in jobs]
    assert all(0 < a <= 1 for a in accs)


def test_a_bad_job_does_not_stop_the_sweep(tmp_path):
    """The issue's sweep ``dataset=digits,fashion_mnist dataset.subset=2000`` has one invalid job (digits has
    1,437 points): it gets its one-line error, the other jobs still run, and the sweep exits 2 listing it."""
    r = run_cli(["-m", "trainer.epochs=1", "dataset.subset=5000,300"], tmp_path)
    assert r.returncode == 2
    assert "error: dataset.subset=5000 is invalid" in r.stderr and "1 job(s) of the sweep failed" in r.stderr
    assert "Traceback" not in r.stderr
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    assert "dataset.subset" in (sweep / "0" / "error.txt").read_text()
    assert json.loads((sweep / "1" / "metrics.json").read_text())["train/n_train"] == 300
    from influencelab.report import collect

    _, rows = collect(sweep)
    assert "dataset.subset=5000" in rows[0]["error"] and "error" not in rows[1]


def test_context_validates_before_reading_data(tmp_path):
    """Invalid values fail at composition, before any data is loaded or cache written."""
    from influencelab.errors import ConfigError

    cfg = make_config(["trainer.epochs=0"], tmp_path / "cache")
    with pytest.raises(ConfigError, match="trainer.epochs"):
        Context(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_fashion_mnist_cnn_reaches_80_percent(run_pipeline):
    """Real data (Debian's dataset-fashion-mnist): 3,000 training points, CNN, >= 0.80 test accuracy."""
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have dataset-fashion-mnist installed (.ci/run installs it)")
        pytest.skip("apt-get install dataset-fashion-mnist to run the real-data test")
    _, m = run_pipeline(["dataset=fashion_mnist", "dataset.subset=3000", "dataset.test_subset=2000",
                         "trainer.epochs=4", "stages=[train]"])
    assert m["train/test_accuracy"] >= 0.80


def test_training_without_a_point_keeps_every_other_batch():
    """``Trainer.fit(exclude=...)``: excluding nothing changes nothing; excluding one point moves the model far
    less than retraining on the subset without it (which reshuffles every batch) — the leave-one-out setting."""
    from influencelab.data.digits import Digits
    from influencelab.models import cnn
    from influencelab.train import Trainer

    train, _ = Digits(subset=300, seed=0).load()
    trainer = Trainer(epochs=3, batch_size=32, lr=3e-3, seed=0, device="cpu")

    def fit(data, exclude=None) -> torch.Tensor:
        torch.manual_seed(0)
        model = cnn(10, 1, 8, channels=(8, 16), hidden=32)
        trainer.fit(model, data, exclude=exclude)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    full = fit(train)
    assert torch.equal(fit(train, exclude=torch.tensor([], dtype=torch.long)), full)
    dropped = (fit(train, exclude=torch.tensor([17])) - full).norm()
    reshuffled = (fit(train.subset(torch.cat([torch.arange(17), torch.arange(18, 300)]))) - full).norm()
    assert 0 < dropped < 0.5 * reshuffled, (float(dropped), float(reshuffled))


def test_swept_values_reads_the_sweep_from_multirun_yaml(tmp_path):
    """The damping values a multirun sweeps over: command-line choice and range sweeps, hydra.sweeper.params."""
    from omegaconf import OmegaConf

    from influencelab.cli import swept_values

    def sweep(task: list[str], params: dict | None = None) -> Path:
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        OmegaConf.save({"hydra": {"overrides": {"task": task}, "sweeper": {"params": params}}}, d / "multirun.yaml")
        return d

    assert swept_values(sweep(["seed=0,1", "solver.damping=1e-4,1e-3,auto"]), "solver.damping") == [1e-4, 1e-3, "auto"]
    assert swept_values(sweep(["solver.damping=range(1,3)"]), "solver.damping") == [1, 2]
    assert swept_values(sweep([], {"solver.damping": "0.1,1"}), "solver.damping") == [0.1, 1]
    assert swept_values(sweep(["solver.damping=1e-3", "seed=0,1"]), "solver.damping") == []  # not swept
    assert swept_values(tmp_path / "none", "solver.damping") == []  # no multirun.yaml (another sweeper)

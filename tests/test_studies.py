"""The paper's experiment presets end to end on tiny configurations, the report command and the notebook."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from conftest import REPO, make_config, need_fashion_mnist, run_cli

SMALL = ["dataset.subset=200", "trainer.epochs=2", "dataset.test_subset=100"]


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_preset_composes_and_resolves(preset):
    """Every ``experiment=`` preset composes with the defaults and all its interpolations resolve."""
    from omegaconf import OmegaConf

    cfg = make_config([f"experiment={preset}"])
    OmegaConf.resolve(cfg)
    assert cfg.stages and all(isinstance(s, str) for s in cfg.stages)


def test_memorisation_preset_fits_the_flipped_labels(run_pipeline):
    """The memorisation preset's schedule (512-unit CNN, 150 epochs, cosine, no weight decay) fits every flipped
    label of real FashionMNIST; here 500 points instead of 5,000."""
    need_fashion_mnist()
    _, m = run_pipeline(["experiment=mislabel_memorize", "dataset.subset=500", "dataset.test_subset=500",
                         "solver=identity"])
    assert m["train/n_flipped"] == 50
    assert m["train/train_accuracy"] == 1.0  # noisy labels, flipped ones included, are all fitted


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_attribution_preset(run_pipeline):
    run_dir, m = run_pipeline(["experiment=attribution", "dataset=digits", *SMALL])
    assert (run_dir / "figures" / "attribution.png").stat().st_size > 10_000
    assert (run_dir / "scores" / "pairwise.safetensors").exists()


def test_mislabel_preset_reports_all_baselines(run_pipeline):
    run_dir, m = run_pipeline(["experiment=mislabel", "dataset=digits", *SMALL, "dataset.label_noise=0.1"])
    for method in ("self_influence", "identity", "loss", "random"):
        for key in ("recall@10", "recall@20", "recall@30", "recall@40", "recall@50", "curve_auc", "roc_auc", "ap"):
            assert f"mislabel/{method}/{key}" in m
    with open(run_dir / "mislabel_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 201 and float(rows[-1]["self_influence"]) == 1.0
    assert (run_dir / "figures" / "mislabel_detection.png").exists()


def test_mislabel_without_noise_is_one_line_error(tmp_path):
    r = run_cli(["experiment=mislabel", "dataset=digits", *SMALL, "dataset.label_noise=0.0"], tmp_path)
    assert r.returncode == 2 and "dataset.label_noise" in r.stderr and "Traceback" not in r.stderr


def test_ihvp_preset_against_cg(run_pipeline):
    _, m = run_pipeline(["experiment=ihvp_cnn", "dataset=digits", *SMALL, "query.n=3", "solver=ekfac",
                         "solver.damping=[1e-2,100]", "+ihvp.reference_args.tol=1e-5"])
    for d in ("0.01", "100"):
        assert 0 <= m[f"ihvp/rel_error@{d}"] < 2 and -1 <= m[f"ihvp/cosine@{d}"] <= 1
    # damping much larger than the curvature: both are ~ v / λ, so the error vanishes
    assert m["ihvp/rel_error@100"] < 0.05 < m["ihvp/rel_error@0.01"]


def test_ihvp_resnet18_preset_on_tiny_config(run_pipeline):
    """The Sec. 6.2 preset itself (ResNet-18 on FashionMNIST), shrunk: 64 points, the classifier tracked."""
    need_fashion_mnist()
    _, m = run_pipeline(["experiment=ihvp", "dataset.subset=64", "dataset.test_subset=50", "trainer.epochs=1",
                         "query.n=2", "solver.modules=re:fc", "solver.damping=[1e-2,100]",
                         "ihvp.reference_args.max_examples=64", "+ihvp.reference_args.tol=1e-5"])
    assert 0 <= m["ihvp/rel_error@0.01"] < 2 and -1 <= m["ihvp/cosine@0.01"] <= 1
    assert m["ihvp/rel_error@100"] < 0.05  # damping far above the curvature: both are ~ v / λ


@pytest.mark.parametrize("preset, model, modules", [("mislabel_flowers102", "resnet50", "re:fc"),
                                                    ("mislabel_flowers102", "vit_b16", "re:head"),
                                                    ("mislabel_food101", "resnet50", "re:fc")])
def test_transfer_mislabel_presets_on_standin_files(run_pipeline, tmp_path, preset, model, modules):
    """The Flowers102 / Food101 presets end to end on stand-in files in torchvision's exact layout (random pixels:
    the archives and the pretrained timm weights cannot be fetched here), shrunk: 32-pixel images, random init,
    one epoch, the classifier tracked."""
    import standins

    root = tmp_path / "data"
    if preset == "mislabel_flowers102":
        standins.flowers102(root, per_split=10)
    else:
        standins.food101(root, per_class=4)
    run_dir, m = run_pipeline([f"experiment={preset}", f"model={model}", f"dataset.root={root}",
                               "dataset.download=false", "model.pretrained=false", "dataset.image_size=32",
                               "trainer.epochs=1", f"solver.modules={modules}"])
    assert m["train/n_flipped"] == 1 and 0 <= m["mislabel/self_influence/roc_auc"] <= 1
    assert (run_dir / "figures" / "mislabel_detection.png").exists()


def test_ihvp_lissa_single_damping_metrics(run_pipeline):
    _, m = run_pipeline(["experiment=ihvp_cnn", "dataset=digits", *SMALL, "query.n=2", "solver=lissa",
                         "solver.damping=0.1", "solver.depth=20", "+ihvp.reference_args.tol=1e-5"])
    assert m["ihvp/solver"] == "lissa" and m["ihvp/damping"] == 0.1 and m["ihvp/time_s"] > 0


def test_lds_preset_on_tiny_config(run_pipeline, cache_dir):
    overrides = ["experiment=lds", "dataset=digits", "dataset.subset=120", "trainer.epochs=2", "query.n=6",
                 "lds.n_subsets=6", "lds.bootstrap=50"]
    run_dir, m = run_pipeline(overrides, "ekfac")
    for key in ("lds/mean", "lds/std", "lds/ci_low", "lds/ci_high", "lds_margin/mean"):
        assert key in m
    assert -1 <= m["lds/mean"] <= 1 and m["lds/ci_low"] <= m["lds/mean"] <= m["lds/ci_high"]
    n_truth = len(list((cache_dir / "retrain").glob("*.safetensors")))
    assert n_truth == 6
    _, m2 = run_pipeline([*overrides, "solver=identity"], "identity")  # same ground truth, computed once
    assert len(list((cache_dir / "retrain").glob("*.safetensors"))) == n_truth
    assert m2["time/lds_truth_s"] < m["time/lds_truth_s"]


@pytest.mark.parametrize("retrain", ["scratch", "warm"])
def test_loo_preset(run_pipeline, retrain):
    run_dir, m = run_pipeline(["experiment=loo", "dataset.subset=100", "trainer.epochs=3", "loo.k=3",
                               "loo.n_queries=2", f"loo.retrain={retrain}", "loo.warm_epochs=1"])
    assert m["loo/n_points"] == 6 and (run_dir / "figures" / "loo.png").exists()
    for key in ("loo/pearson", "loo/spearman", "loo/pearson_within", "loo/spearman_within"):
        assert -1 <= m[key] <= 1, key


def test_report_on_a_small_multirun(tmp_path):
    r = run_cli(["-m", "experiment=mislabel", "dataset=digits", *SMALL, "solver=ekfac,identity"], tmp_path)
    assert r.returncode == 0, r.stderr
    (sweep,) = list((tmp_path / "multirun").glob("*/*"))
    from influencelab.report import report

    md, csv_path, figs = report(sweep)
    text = md.read_text()
    assert "solver" in text and "mislabel/self_influence/recall@10" in text
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert {r["solver"] for r in rows} == {"ekfac", "identity"}
    assert any(p.name == "detection_curves.png" for p in figs)


def test_notebook_executes_on_a_small_run(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    r = run_cli(["experiment=quickstart", "dataset.subset=300", "trainer.epochs=3", "hydra.run.dir=run"], tmp_path)
    assert r.returncode == 0, r.stderr
    nb = nbformat.read(REPO / "notebooks" / "explore_run.ipynb", as_version=4)
    os.environ["INFLUENCELAB_RUN"] = str(tmp_path / "run")
    os.environ["INFLUENCELAB_CACHE"] = str(tmp_path / "cache")
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.pop("INFLUENCELAB_RUN")
        os.environ.pop("INFLUENCELAB_CACHE")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum(1 for o in outputs if "image/png" in o.get("data", {})) >= 3


def test_report_unescapes_sweep_override_values(tmp_path):
    """Hydra escapes ``:`` in a sweep job's overrides (``solver.modules=last\\:1``); the report shows ``last:1``."""
    from influencelab.report import overrides

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- solver.modules=last\\:1\n- solver.damping=[1e-3,1]\n")
    assert overrides(tmp_path) == {"solver.modules": "last:1", "solver.damping": "[1e-3,1]"}

"""Damping as an axis: a damping list's mislabel results as one row per damping (``mislabel_by_damping.csv``),
equal to the flat metrics, per-damping detection curves, and the report's plot against λ."""

from __future__ import annotations

import csv

from conftest import run_cli


def test_mislabel_damping_list_is_a_long_table_and_a_report_axis(tmp_path):
    r = run_cli(["-m", "experiment=quickstart", "dataset.subset=300", "trainer.epochs=3", "logger=none",
                 "solver.damping=[1e-3,1e-1,1]", "stages=[train,fit,self,mislabel]"], tmp_path)
    assert r.returncode == 0, r.stderr
    (job,) = (tmp_path / "multirun").glob("*/*/0")
    import json

    m = json.loads((job / "metrics.json").read_text())
    with open(job / "mislabel_by_damping.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(x["damping"]) for x in rows] == [1e-3, 0.1, 1.0]
    assert [float(x["lambda"]) for x in rows] == [1e-3, 0.1, 1.0]
    # the first damping's row is the flat self_influence metrics, the others the @λ ones
    for x, prefix in zip(rows, ["mislabel/self_influence", "mislabel/self_influence@0.1",
                                "mislabel/self_influence@1.0"], strict=True):
        for key in ("recall@10", "recall@20", "roc_auc", "recall@10_ci_low", "recall@10_ci_high"):
            assert float(x[key]) == m[f"{prefix}/{key}"], (prefix, key)
    with open(job / "mislabel_curve.csv") as f:
        header = next(csv.reader(f))
    assert {"self_influence", "self_influence@0.1", "self_influence@1.0", "loss", "random"} <= set(header)
    from influencelab.report import report

    _, _, figs = report(job.parent)
    assert "mislabel_vs_damping.png" in [p.name for p in figs]


def test_damping_plot_of_a_sweep_with_a_job_without_damping(tmp_path):
    """A sweep of EK-FAC (λ = 1e-3, 1) beside identity (no damping: its row's λ is nan) draws the EK-FAC line and
    leaves identity off the λ axis (it once crashed the report: ``run mislabel_standard``)."""
    from influencelab.stages.mislabel import report_figure

    cols = ["damping", "lambda", "recall@10", "recall@20", "roc_auc"]
    for job, lines in (("0", [[0.001, 0.001, 0.7, 0.9, 0.97], [1.0, 1.0, 0.8, 0.95, 0.98]]),
                       ("1", [[0.0, "nan", 0.72, 0.97, 0.975]])):
        (tmp_path / job).mkdir()
        with open(tmp_path / job / "mislabel_by_damping.csv", "w", newline="") as f:
            csv.writer(f).writerows([cols, *lines])
    rows = [{"job": "0", "solver": "ekfac"}, {"job": "1", "solver": "identity"}]
    figs = report_figure(tmp_path, rows, tmp_path / "figs")
    assert [p.name for p in figs] == ["mislabel_vs_damping.png"] and figs[0].stat().st_size > 0


def test_one_damping_keeps_its_axis_in_files_load_run_and_the_api(run_pipeline):
    """With one damping, the score files' ``scores_by_damping``, ``load_run``'s ``*_by_damping`` and the API all
    are ``[1, ...]`` and hold the same numbers; ``scores`` / ``run.pairwise_scores`` / ``run.self_scores`` are
    the first damping's, without the axis, for one damping as for several."""
    import torch
    from safetensors.torch import load_file

    from influencelab import load_run

    for dampings in ("1e-2", "[1e-2,1.0]"):
        run_dir, _ = run_pipeline(["dataset.subset=200", "model=mlp", "trainer.epochs=1", "query.n=3",
                                   f"solver.damping={dampings}", "stages=[train,fit,pairwise,self]"],
                                  name=f"run{dampings}")
        n = 1 if dampings == "1e-2" else 2
        pw = load_file(str(run_dir / "scores" / "pairwise.safetensors"))
        si = load_file(str(run_dir / "scores" / "self.safetensors"))
        assert pw["scores_by_damping"].shape == (n, 3, 200) and pw["scores"].shape == (3, 200)
        assert si["scores_by_damping"].shape == (n, 200) and si["scores"].shape == (200,)
        run = load_run(run_dir)
        assert torch.equal(run.pairwise_by_damping, pw["scores_by_damping"])
        assert torch.equal(run.self_by_damping, si["scores_by_damping"])
        assert torch.equal(run.pairwise_scores, run.pairwise_by_damping[0])
        assert torch.equal(run.self_scores, run.self_by_damping[0])
        attr = run.attributor()
        api_self = attr.self_influence()
        qpos = torch.searchsorted(run.test.indices, pw["query_indices"])
        api_pw = attr.pairwise(run.test.subset(qpos))
        assert api_self.shape == run.self_by_damping.shape and api_pw.shape == run.pairwise_by_damping.shape
        torch.testing.assert_close(api_self, run.self_by_damping, rtol=1e-4,
                                   atol=1e-5 * float(api_self.abs().max()))
        torch.testing.assert_close(api_pw, run.pairwise_by_damping, rtol=1e-4,
                                   atol=1e-5 * float(api_pw.abs().max()))

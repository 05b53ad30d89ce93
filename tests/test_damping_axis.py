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

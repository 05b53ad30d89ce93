"""``influencelab.load_sweep``: a real multirun (a damping list, a single damping, a job that fails on bad input)
as a DataFrame of one row per job and damping, equal to the jobs' metrics.json; the naming rule of per-damping
metrics on every form the stages write."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import run_cli

pd = pytest.importorskip("pandas")

import influencelab  # noqa: E402
from influencelab.sweeps import split_dampings, split_metric  # noqa: E402

# job 0 scores a damping list in one pass, job 1 one damping, job 2 stops on bad input
SWEEP = ["-m", "dataset=digits", "dataset.subset=300", "dataset.label_noise=0.1", "model=mlp", "trainer.epochs=1",
         "logger=none", "stages=[train,fit,self,mislabel]", "solver.damping=[1e-3,1e-1],1e-2,-1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    r = run_cli(SWEEP, tmp)
    assert r.returncode == 2, r.stderr  # the sweep ran, one job failed
    (sweep,) = (tmp / "multirun").glob("*/*")
    return sweep


def metrics(sweep: Path, job: str) -> dict:
    return json.loads((sweep / job / "metrics.json").read_text())


def same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def test_one_row_per_job_and_damping(sweep):
    df = influencelab.load_sweep(sweep)
    assert df["job"].tolist() == ["0", "0", "1", "2"]
    assert df["damping"].tolist() == [0.001, 0.1, 0.01, -1.0]  # a one-damping job (and a failed one) at its own
    # overrides (as written) and Hydra choices as columns, before damping and the metrics
    assert df["solver.damping"].tolist() == ["[0.001,0.1]", "[0.001,0.1]", "0.01", "-1"]
    assert (df["dataset.subset"] == "300").all() and (df["trainer.epochs"] == "1").all()
    assert (df["dataset"] == "digits").all() and (df["model"] == "mlp").all() and (df["solver"] == "ekfac").all()
    assert list(df.columns[:2]) == ["job", "dataset"] and list(df.columns).index("damping") < list(
        df.columns).index("train/test_accuracy")
    assert not [c for c in df.columns if split_metric(c)], "a column still carries its @<damping>"

    m0, m1 = metrics(sweep, "0"), metrics(sweep, "1")
    recall = "mislabel/self_influence/recall@10"
    # the first damping's metrics are the bare names, the others' their @λ names
    assert df.loc[0, recall] == m0[recall] and df.loc[1, recall] == m0["mislabel/self_influence@0.1/recall@10"]
    assert df.loc[1, "mislabel/self_influence/roc_auc"] == m0["mislabel/self_influence@0.1/roc_auc"]
    # metrics without a damping repeated on each of the job's rows
    assert df.loc[0, "train/test_accuracy"] == df.loc[1, "train/test_accuracy"] == m0["train/test_accuracy"]
    assert df.loc[0, "mislabel/loss/recall@10"] == df.loc[1, "mislabel/loss/recall@10"] == m0["mislabel/loss/recall@10"]
    # a job of one damping: its metrics as they are
    assert all(same(df.loc[2, k], v) for k, v in m1.items())

    # the failed job: its message, no metrics
    assert "solver.damping=-1" in df.loc[3, "error"] and df["error"].iloc[:3].isna().all()
    assert pd.isna(df.loc[3, "train/test_accuracy"])


def test_one_row_per_job_with_the_metrics_as_named(sweep):
    wide = influencelab.load_sweep(sweep, by_damping=False)
    assert wide["job"].tolist() == ["0", "1", "2"] and "damping" not in wide
    for i, job in enumerate(("0", "1")):
        m = metrics(sweep, job)
        assert all(same(wide.loc[i, k], v) for k, v in m.items()), job
    assert "mislabel/self_influence@0.1/recall@10" in wide and wide["error"].notna().tolist() == [False, False, True]
    # missing=None: a metric the job did not log is None, not NaN (the failed job has none)
    kept = influencelab.load_sweep(sweep, by_damping=False, missing=None)
    assert kept.loc[2, "train/test_accuracy"] is None and kept.loc[0, "train/test_accuracy"] == m["train/test_accuracy"]
    assert kept.loc[0, "error"] is None and list(kept.columns) == list(wide.columns)


def test_report_is_load_sweep_written_and_read_back(sweep, tmp_path):
    """influencelab-report's table is load_sweep's one-row-per-job frame; its report.csv, read by load_sweep,
    gives the frame of the directory again (both forms), and tells a metric logged as NaN from one not logged."""
    import shutil

    from influencelab.report import collect, report

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    m = metrics(copy, "1")
    m["ihvp/rel_error"] = float("nan")  # as a diverged solver logs it
    (copy / "1" / "metrics.json").write_text(json.dumps(m))
    _, csv_path, _ = report(copy)
    cells = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    assert cells["ihvp/rel_error"].tolist() == ["", "nan", ""]  # logged NaN vs never logged
    assert cells["job"].tolist() == ["0", "1", "2"] and "solver.damping=-1" in cells.loc[2, "error"]

    for by_damping in (False, True):
        direct, back = (influencelab.load_sweep(p, by_damping=by_damping) for p in (copy, csv_path))
        assert list(back.columns) == list(direct.columns)
        pd.testing.assert_frame_equal(*(d.astype(object).where(d.notna(), None) for d in (back, direct)))
    # the damping list's long form beside it: a damping column, the metrics without their @λ
    long = pd.read_csv(copy / "report_by_damping.csv", dtype={"job": str})
    assert long["job"].tolist() == ["0", "0", "1", "2"] and long["damping"].tolist() == [0.001, 0.1, 0.01, -1.0]
    assert long.loc[1, "mislabel/self_influence/recall@10"] == metrics(copy, "0")[
        "mislabel/self_influence@0.1/recall@10"]
    _, rows = collect(copy)  # what the plots read: each job's columns without those it does not have
    assert [r["job"] for r in rows] == ["0", "1", "2"] and "train/test_accuracy" not in rows[2]
    assert math.isnan(rows[1]["ihvp/rel_error"]) and "ihvp/rel_error" not in rows[0]


def test_naming_rule_of_per_damping_metrics():
    assert split_metric("ihvp/rel_error@0.001") == ("ihvp/rel_error", 0.001)
    assert split_metric("ihvp/cosine@10") == ("ihvp/cosine", 10.0)  # a damping of 10 ...
    assert split_metric("mislabel/loss/recall@10") is None  # ... but recall@10 is the top 10%
    assert split_metric("mislabel/self_influence@1.0/recall@10") == ("mislabel/self_influence/recall@10", 1.0)
    assert split_metric("mislabel/self_influence@1e-05/recall@10_ci_low") == (
        "mislabel/self_influence/recall@10_ci_low", 1e-5)
    assert split_metric("ihvp/iters_to_0.01@0.001") == ("ihvp/iters_to_0.01", 0.001)
    assert split_metric("solver/iterations@1e-05") == ("solver/iterations", 1e-5)
    assert split_metric("lds/mean@auto") == ("lds/mean", "auto")
    assert split_metric("ihvp/iters_to_0.01") is None and split_metric("train/test_accuracy") is None

    nan = float("nan")
    wide = pd.DataFrame([
        # LDS over a list: the first damping bare, the second @0.1 (a NaN there stays NaN); CG's own per damping
        {"job": "0", "solver.damping": "[1e-3,0.1]", "lds/mean": 0.3, "lds/std": 0.05, "lds/mean@0.1": 0.2,
         "lds/std@0.1": nan, "solver/iterations@0.001": 50, "solver/iterations@0.1": 10, "time/fit_s": 2.0},
        # IHVP at one damping: both names, equal
        {"job": "1", "solver.damping": "10", "ihvp/rel_error": 0.5, "ihvp/rel_error@10": 0.5, "time/fit_s": 1.0},
        {"job": "2", "solver.damping": "0.01", "lds/mean": 0.4, "time/fit_s": 3.0},  # nothing per damping
    ])
    out = split_dampings(wide, first="solver.damping")
    assert out["job"].tolist() == ["0", "0", "1", "2"]
    assert out["damping"].tolist() == [0.001, 0.1, 10.0, 0.01]  # job 2: at its one damping
    assert out["lds/mean"].tolist() == [0.3, 0.2, pytest.approx(nan, nan_ok=True), 0.4]
    assert out.loc[0, "lds/std"] == 0.05 and math.isnan(out.loc[1, "lds/std"])
    assert out["solver/iterations"].tolist()[:2] == [50, 10] and out.loc[2, "ihvp/rel_error"] == 0.5
    assert out["time/fit_s"].tolist() == [2.0, 2.0, 1.0, 3.0]
    assert list(out.columns[:3]) == ["job", "solver.damping", "damping"]
    # without the first damping, its bare values are repeated on the job's rows where a damping has none
    out = split_dampings(wide)
    assert out.loc[0, "lds/mean"] == 0.3 and out.loc[1, "lds/mean"] == 0.2 and out.loc[1, "lds/std"] == 0.05
    assert out["damping"].tolist()[:2] == [0.001, 0.1]


def test_not_a_sweep(tmp_path):
    from influencelab.errors import InfluenceLabError

    with pytest.raises(InfluenceLabError, match="no runs"):
        influencelab.load_sweep(tmp_path)
    with pytest.raises(InfluenceLabError, match="neither a directory of runs nor a report.csv"):
        influencelab.load_sweep(tmp_path / "missing")

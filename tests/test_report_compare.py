"""``influencelab-report`` on a real solver x damping sweep: the agreement between solvers (Spearman, top-k overlap
against the most accurate converged job), the compact table, and failed / unfinished jobs flagged with their error.

One tiny multirun (digits, 150 points, the linear model so that ``exact`` fits, 1 epoch, 4 queries, exact / EK-FAC /
CG / LiSSA at λ = 0.01 and 0.1), plus a second multirun into the same folder: a job that stops on bad input and one
that trains another model (another seed). A killed job is a copy of a finished one cut back to what a kill during
its ``self`` stage leaves (no ``self`` metrics or scores, a log ending in ``Killed``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file
from scipy.stats import spearmanr

from conftest import run_cli

SWEEP = ["-m", "dataset=digits", "dataset.subset=150", "dataset.test_subset=30", "trainer.epochs=1", "model=linear",
         "query.n=4", "stages=[train,fit,pairwise,self]", "logger=none"]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The sweep folder after ``influencelab-report``: jobs 0-3 exact, ekfac, cg, lissa (one model); x0 failed
    (dataset.subset=5000 > 1,437), x1 EK-FAC on a model of another seed; 4 a copy of the LiSSA job killed in
    ``self``."""
    tmp = tmp_path_factory.mktemp("compare")
    root = tmp / "sweep"
    r = run_cli([*SWEEP, "solver=exact,ekfac,cg,lissa", "solver.damping=[1e-2,1e-1]", f"hydra.sweep.dir={root}"],
                tmp, env=ENV)
    assert r.returncode == 0, r.stderr
    r = run_cli([*SWEEP, "solver=ekfac", "solver.damping=[1e-2,1e-1]", "trainer.seed=1", "dataset.subset=5000,150",
                 f"hydra.sweep.dir={root}", "hydra.sweep.subdir=x${hydra.job.num}"], tmp, env=ENV)
    assert r.returncode == 2 and "1 job(s) of the sweep failed" in r.stderr, r.stderr
    killed = root / "4"
    shutil.copytree(root / "3", killed)
    m = json.loads((killed / "metrics.json").read_text())
    m = {k: v for k, v in m.items() if not k.startswith(("time/self", "mem/self", "solver/"))}
    (killed / "metrics.json").write_text(json.dumps(m))
    (killed / "scores" / "self.safetensors").unlink()
    with open(next(killed.glob("*.log")), "a") as f:
        f.write("[2026-12-05 10:00:00,000][influencelab][INFO] - lissa: 12/200 (6%)\nKilled\n")
    from influencelab.report import report

    md, _, figs = report(root)
    return root, md.read_text(), figs


def _scores(job, name):
    t = load_file(str(job / "scores" / f"{name}.safetensors"))
    return t["scores_by_damping"].double().numpy()  # [2 dampings, ...]


def test_agreement_is_spearman_and_top_k_of_the_score_files(sweep):
    """Every number of report_agreement.csv is recomputed from the jobs' score files; the reference at every
    damping is exact, and CG (converged) ranks as exact does."""
    root, _, _ = sweep
    t = pd.read_csv(root / "report_agreement.csv", dtype={"job_a": str, "job_b": str})
    main = t[t["job_a"].isin(["0", "1", "2", "3", "4"])]
    ref = main[main["b_is_reference"]]
    assert set(ref["b"]) == {"exact"} and set(ref["reference_kind"]) == {"accuracy"}
    # the killed copy has pairwise scores only; the EK-FAC job of another model is never paired with these
    assert set(ref[ref["pass"] == "self"]["a"]) == {"ekfac", "cg", "lissa"}
    assert not ((t["job_a"] == "x1") | (t["job_b"] == "x1")).any()
    checked = 0
    for r in main.to_dict("records"):
        a, b = (_scores(root / r[j], r["pass"]) for j in ("job_a", "job_b"))
        i = [0.01, 0.1].index(r["damping"])
        a2, b2 = np.atleast_2d(a[i]), np.atleast_2d(b[i])
        k = r["k"]
        rho = [spearmanr(x, y).statistic for x, y in zip(a2, b2, strict=True)]
        top = [len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k])) / k for x, y in zip(a2, b2, strict=True)]
        assert r["spearman"] == pytest.approx(np.mean(rho), abs=1e-9)
        assert r["spearman_min"] == pytest.approx(np.min(rho), abs=1e-9)
        assert r["top_k_overlap"] == pytest.approx(np.mean(top), abs=1e-9)
        checked += 1
    assert checked >= 20 and (main["k"] == 10).all()  # 1% of 150, at least 10
    cg = ref[ref["a"] == "cg"]
    assert (cg["a_converged"]).all() and (cg["spearman"] > 0.999).all()
    lissa = json.loads(_meta(root / "3", "self")["convergence"])
    row = ref[(ref["a"] == "lissa") & (ref["pass"] == "self") & (ref["damping"] == 0.01)].iloc[0]
    assert row["a_converged"] == lissa["0.01"]["converged"]
    assert row["a_residual"] == pytest.approx(lissa["0.01"]["rel_residual_max"])


def _meta(job, name):
    from safetensors import safe_open

    with safe_open(str(job / "scores" / f"{name}.safetensors"), "pt") as f:
        return f.metadata()


def test_reference_rule_without_exact(sweep):
    """Without exact, converged CG is the reference; with only EK-FAC and LiSSA, EK-FAC is unless LiSSA
    converged, and the report says these measure agreement, not accuracy."""
    from influencelab.compare import compare

    root, _, _ = sweep
    t, _ = compare(root, [root / j for j in ("1", "2", "3")])
    assert set(t[t["b_is_reference"]]["b"]) == {"cg"}
    t, _ = compare(root, [root / j for j in ("1", "3")])
    for r in t.to_dict("records"):
        lissa_converged = r["a_converged"] if r["a"] == "lissa" else r["b_converged"]
        assert r["b"] == ("lissa" if lissa_converged else "ekfac")
        assert r["reference_kind"] == ("accuracy" if lissa_converged else "agreement")
    # one solver setting on two models (a sweep over something else): nothing to compare, nothing to say
    t, notes = compare(root, [root / j for j in ("1", "x1")])
    assert t.empty and notes == []


def test_compact_table_and_flagged_jobs(sweep):
    root, md, figs = sweep
    small = pd.read_csv(root / "report_compact.csv", dtype={"job": str})
    status = dict(zip(small["job"], small["status"], strict=False))
    assert status == {"0": "ok", "1": "ok", "2": "ok", "3": "ok", "4": "incomplete", "x0": "failed", "x1": "ok"}
    err = dict(zip(small["job"], small["error"], strict=False))
    assert "dataset.subset=5000" in err["x0"]
    assert "stopped in stage self" in err["4"] and err["4"].endswith("Killed")
    # one row per job and damping; only what differs between jobs (no logger, trainer or empty experiment column)
    assert len(small[small["job"] == "1"]) == 2 and sorted(small[small["job"] == "1"]["damping"]) == [0.01, 0.1]
    assert not {"logger", "trainer", "experiment", "model", "stages"} & set(small.columns)
    assert {"solver", "damping", "solver/converged", "agree/self_spearman", "agree/reference"} <= set(small.columns)
    assert "Every job: dataset=digits" in md and "model=linear" in md
    # report.csv keeps load_sweep's columns (experiments/tables.py reads them)
    import influencelab

    assert list(pd.read_csv(root / "report.csv", nrows=0).columns) == list(
        influencelab.load_sweep(root, by_damping=False).columns)
    assert "## Failed or unfinished jobs" in md and "## Do the solvers agree?" in md
    assert "do not all share one trained model" in md and "x1" in md
    assert [p.name for p in figs][0] == "agreement.png" and figs[0].stat().st_size > 20_000


def test_report_redrawn_from_its_csv_keeps_the_agreement(sweep, tmp_path):
    from influencelab.report import report

    root, _, _ = sweep
    for name in ("report.csv", "report_agreement.csv"):
        shutil.copy(root / name, tmp_path / name)
    md, _, figs = report(tmp_path / "report.csv")
    assert "## Do the solvers agree?" in md.read_text() and figs[0].name == "agreement.png"

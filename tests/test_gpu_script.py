"""The prepared GPU check cannot rot between GPU sessions: ``benchmarks/gpu/run.py --tiny`` (the same script, the
same four architectures narrowed, every configuration) runs on the CPU and writes what summarize.py commits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pandas as pd

from conftest import REPO


def test_gpu_run_script_tiny_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "run.py"), "--tiny", "--out", str(out),
                        "--budget", "240"], env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(out / "bench.csv")
    # every case x (ekfac, kfac) x (fp32, bf16), influencelab only (no peer in --tiny), none failed or skipped
    assert len(df) == 16 and set(df["impl"]) == {"influencelab"}, df[["case", "impl", "error"]]
    assert set(df["case"]) == {"cnn", "resnet18", "resnet50", "vit_b16"}
    assert df["error"].isna().all(), df["error"].dropna().tolist()
    for col in ("fit_s", "self_s", "pairwise_s"):
        assert (df[col] > 0).all() and df[col].map(math.isfinite).all()
    assert (df["fit_self_s"] - df["fit_s"] - df["self_s"]).abs().max() < 1e-9
    # bf16 rows rank the points as the fp32 ones do (our scores are float32 sums of bf16 products)
    assert (df.loc[df["precision"] == "bf16", "spearman_self_vs_fp32"] > 0.9).all()
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["tiny"] is True and env_json["queries"] == 8

    # summarize.py: merges calls with a run column, keeps env and renders the RESULTS table from the merged file
    dest = tmp_path / "results"
    s = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "summarize.py"), str(out), str(out),
                        "--dest", str(dest)], env=env, capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr[-3000:]
    merged = pd.read_csv(dest / "bench.csv")
    assert len(merged) == 32 and sorted(set(merged["run"])) == [1, 2]
    table = [line for line in s.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 32  # header + one row per measured (run, case, strategy, precision)
    assert "| cnn (96, 28) | EK-FAC, fp32 | 1 |" in s.stdout


def test_sec62_paper_script_tiny_on_cpu(tmp_path):
    """``benchmarks/gpu/sec62_paper.py --tiny`` (issue 29 item 7's GPU run, narrowed): every solver x damping row
    with finite numbers against an exact reference whose residuals are recorded."""
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "sec62_paper.py"), "--tiny", "--out",
                        str(out), "--budget", "400"], env=env, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    solvers = ["ekfac", "kfac", "lissa", "arnoldi", "lissa_ekfac", "cg_ekfac"]
    dampings = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    df = pd.read_csv(out / "sec62.csv")
    assert df["error"].isna().all(), df.loc[df["error"].notna(), ["solver", "damping", "error"]]
    assert sorted(zip(df["solver"], df["damping"], strict=True)) == sorted((s, d) for s in solvers for d in dampings)
    stats = [f"{m}{q}" for m in ("rel_error", "cosine", "spearman") for q in ("", "_q25", "_median", "_q75")]
    assert df[stats + ["fit_s", "solve_s", "ref_rel_residual"]].map(math.isfinite).all().all()
    assert (df["n_queries"] == 3).all() and (df["n_curv"] == 24).all() and (df["n_train"] == 96).all()
    # the reference is exact: its measured residual ||(G + λI) x - v|| / ||v|| at every damping (the tiny-damping
    # measurement has a float64 floor of its own, see solvers/gram.py)
    ref = pd.read_csv(out / "reference.csv")
    assert ref["damping"].tolist() == dampings
    assert (ref["rel_residual"] < 1e-4).all() and (ref.loc[ref["damping"] >= 1e-4, "rel_residual"] < 1e-6).all()
    # errors are against that reference at the same damping: CG + EK-FAC converges at λ = 10 (a mismatched damping
    # or query would leave it far off), and agrees in its scores' ranks
    cg = df[(df["solver"] == "cg_ekfac") & (df["damping"] == 10.0)].iloc[0]
    assert cg["rel_error"] < 1e-3 and cg["cosine"] > 0.9999 and cg["spearman"] > 0.999
    # LiSSA ran the tuned rule and says so; the iterative solvers record their own residuals
    lissa = df[df["solver"].isin(["lissa", "lissa_ekfac"])]
    assert lissa["rule"].str.contains("scale=search").all() and lissa["rule"].str.contains("depth=auto").all()
    assert df.loc[df["solver"].isin(["lissa", "lissa_ekfac", "cg_ekfac"]), "rel_residual"].map(math.isfinite).all()
    q = pd.read_csv(out / "sec62_queries.csv")
    assert len(q) == len(solvers) * len(dampings) * 3 and q[["rel_error", "cosine", "spearman"]].notna().all().all()
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["tiny"] is True and env_json["gram_rank"] == 240 and set(solvers) <= set(env_json["phases"])

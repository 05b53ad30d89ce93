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

"""benchmarks/bench_ekfac.py end to end on a small FashionMNIST subset (digits without it): one process per
denormal setting, influencelab through the public Attributor and kronfluence back to back, the CSV with every
column (versions, threads, all three pairwise runs, the median as the figure), agreeing scores, and the ratio
table RESULTS.md is generated from."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("kronfluence")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ekfac.py"


def test_bench_ekfac_writes_both_settings_and_agrees_with_kronfluence(tmp_path):
    out = tmp_path / "ekfac.csv"
    r = subprocess.run([sys.executable, str(BENCH), "--n", "300", "--strategies", "ekfac", "--denormals",
                        "flush,keep", "--epochs", "1", "--out", str(out)], capture_output=True, text=True,
                       env={**os.environ, "INFLUENCELAB_BENCH_RESULTS": str(tmp_path), "WANDB_MODE": "disabled",
                            "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(out)
    assert list(df.columns[:8]) == ["date", "torch", "kronfluence", "threads", "denormals", "n", "strategy", "impl"]
    assert sorted(zip(df["denormals"], df["impl"])) == [("flush", "influencelab"), ("flush", "kronfluence"),
                                                        ("keep", "influencelab"), ("keep", "kronfluence")]
    assert (df["threads"] == 1).all() and df["kronfluence"].notna().all()
    for _, row in df.iterrows():  # the figure is the median of the three runs the CSV keeps
        runs = [float(v) for v in str(row["pairwise_runs_s"]).split(";")]
        assert len(runs) == 3 and row["pairwise_s"] == pytest.approx(statistics.median(runs), abs=1e-3)
        assert row["fit_s"] > 0 and row["self_s"] > 0
    peer = df[df["impl"] == "kronfluence"]
    assert (peer["spearman_self"] > 0.9999).all() and (peer["spearman_pairwise"] > 0.9999).all()
    assert "| 300 | ekfac | flush |" in r.stdout and "ratio" in r.stdout

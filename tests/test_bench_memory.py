"""benchmarks/bench_memory.py --tiny end to end (fp32; fit, then pairwise from its factors): every (implementation,
phase) in a process of its own, the CSV with every column and one row each, the scores of both sides agreeing (same model, data and queries), and the
ratio table. No memory or time is asserted (those are the benchmark's figures, not a test's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("kronfluence")
pytest.importorskip("timm")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
COLUMNS = ["date", "torch", "kronfluence", "threads", "model", "params", "image", "n_train", "n_query", "batch",
           "precision", "impl", "phase", "rss_base_mb", "rss_peak_mb", "peak_inc_mb", "sampled_peak_mb", "seconds",
           "spearman_vs_kronfluence", "spearman_vs_fp32", "note"]


def test_bench_memory_tiny_writes_one_row_per_impl_and_phase(tmp_path):
    out = tmp_path / "memory.csv"
    r = subprocess.run([sys.executable, str(BENCH), "--tiny", "--precisions", "fp32", "--phases", "fit,pairwise", "--out", str(out)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    df = pd.read_csv(out)
    assert list(df.columns) == COLUMNS
    assert sorted(zip(df["impl"], df["phase"])) == sorted(
        (i, p) for i in ("influencelab", "kronfluence") for p in ("fit", "pairwise"))
    assert (df["model"] == "tiny").all() and (df["precision"] == "fp32").all() and (df["threads"] == 1).all()
    assert (df["n_train"] == 32).all() and (df["n_query"] == 4).all() and df["note"].isna().all()
    for c in ("rss_base_mb", "rss_peak_mb", "peak_inc_mb", "sampled_peak_mb", "seconds", "params"):
        assert df[c].notna().all(), c
    ours = df[(df["impl"] == "influencelab") & (df["phase"] != "fit")]
    assert (ours["spearman_vs_kronfluence"] > 0.99).all()  # the same model, data and queries on both sides
    assert "| tiny | fp32 | pairwise |" in r.stdout and "ratio" in r.stdout

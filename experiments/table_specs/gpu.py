"""Section 6c of RESULTS.md: EK-FAC and K-FAC against kronfluence on one GPU (benchmarks/gpu/run.sh on a lent
device; benchmarks/gpu/summarize.py commits its files)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pandas as pd
from tables_engine import Cell, Ref, Section, cell, exists, fmt, load, path, ref

from table_specs.benchmarks import impl_value, peer_ratio

SECTION = Section("6c. On a GPU: EK-FAC and K-FAC against kronfluence")

_GPU = "benchmarks/results/gpu/bench.csv"
GPU_HEADER = ["model (training points, px)", "strategy, precision", "run", "fit + self s: ours / kronfluence",
              "ratio (target ≤ 0.5)", "pairwise s: ours / kronfluence", "ratio", "peak CUDA GB: ours / kronfluence",
              "Spearman self / pairwise"]


def _peak_gb(row: pd.Series) -> float:
    return max(row["peak_fit_mb"], row["peak_self_mb"], row["peak_pairwise_mb"]) / 1024


def gpu_rows(src: str = _GPU) -> list[list[str | Cell]]:
    """One row per measured (run, model, strategy, precision) of a GPU bench.csv (ours measured)."""
    rows: list[list[str | Cell]] = []
    if not exists(src):
        return rows
    df = load(src)
    for _, r in df[(df["impl"] == "influencelab") & df["fit_s"].notna()].iterrows():
        w = dict(run=r["run"], case=r["case"], strategy=r["strategy"], precision=r["precision"])

        def R(key: Callable[[pd.DataFrame], Any], w: dict = w) -> Ref:
            return ref(src, key, **w)

        def ours_theirs(template: str, col: str | Callable[[pd.Series], Any]) -> Cell:
            return cell(template, R(impl_value("influencelab", col)), R(impl_value("kronfluence", col)))

        rows.append([f"{r['model']} ({int(r['n_train']):,}, {int(r['image_size'])})",
                     f"{'EK-FAC' if r['strategy'] == 'ekfac' else 'K-FAC'}, {r['precision']}", str(r["run"]),
                     ours_theirs("{:s3} / {:s3}", "fit_self_s"), cell("**{:.2}**", R(peer_ratio("fit_self_s"))),
                     ours_theirs("{:s3} / {:s3}", "pairwise_s"), cell("{:.2}", R(peer_ratio("pairwise_s"))),
                     ours_theirs("{:s2} / {:s2}", _peak_gb),
                     cell("{:.4} / {:.4}", R(impl_value("kronfluence", "spearman_self")),
                          R(impl_value("kronfluence", "spearman_pairwise")))])
    return rows


SECTION.table("gpu", GPU_HEADER, gpu_rows, "6c: EK-FAC/K-FAC vs kronfluence on one GPU (benchmarks/gpu/run.py)")

# ---------------------------------------------------------------------------------------------------------------
# prose numbers (RESULTS.md's text quotes them as <!-- num:NAME -->...<!-- /num -->)

_TESTS_LOG = "benchmarks/results/gpu/tests.log"


def _g(case: str, precision: str, key: Callable[[pd.DataFrame], Any], run: int = 1) -> Ref:
    return ref(_GPU, key, run=run, case=case, strategy="ekfac", precision=precision)


def _ratio_range(col: str, precision: str) -> Callable[[], str]:
    """min–max over the measurements (EK-FAC, ``precision``) where both sides were measured of ours / theirs."""
    def get() -> str:
        df = load(_GPU)
        sel = df[(df["strategy"] == "ekfac") & (df["precision"] == precision)]
        ratios = [v for (run, case), _ in sel.groupby(["run", "case"])
                  if not math.isnan(v := _g(case, precision, peer_ratio(col), run).value())]
        return f"{fmt(min(ratios), '.2')} to {fmt(max(ratios), '.2')}"
    return get


SECTION.number("gpu_fit_self_ratio_fp32", _ratio_range("fit_self_s", "fp32"))
SECTION.number("gpu_fit_self_ratio_bf16", _ratio_range("fit_self_s", "bf16"))
SECTION.number("gpu_pairwise_ratio_fp32", _ratio_range("pairwise_s", "fp32"))
SECTION.number("gpu_vit_pairwise_ratio_bf16", cell("{:.2}", _g("vit_b16", "bf16", peer_ratio("pairwise_s"), run=2)))
SECTION.number("gpu_vit_fit_self_fp32", cell("{:d}", _g("vit_b16", "fp32", impl_value("influencelab", "fit_self_s"))))
SECTION.number("gpu_vit_fit_self_bf16", cell("{:d}", _g("vit_b16", "bf16", impl_value("influencelab", "fit_self_s"),
                                                        run=2)))
SECTION.number("gpu_spearman_fp32_floor", cell("{}", ref(_GPU, lambda df: fmt(math.floor(min(
    df["spearman_self"].min(), df["spearman_pairwise"].min()) * 1e4) / 1e4, ".4"), precision="fp32",
    impl="kronfluence")))
SECTION.number("gpu_cnn_bf16_kronfluence_pairwise_spearman",
               cell("{:.2}", _g("cnn", "bf16", impl_value("kronfluence", "spearman_pairwise"))))
SECTION.number("gpu_cnn_self_vs_fp32", cell("{:.5}", _g("cnn", "bf16",
                                                         impl_value("influencelab", "spearman_self_vs_fp32"))))
SECTION.number("gpu_resnet18_self_vs_fp32", cell("{:.4}", _g("resnet18", "bf16",
                                                              impl_value("influencelab", "spearman_self_vs_fp32"))))
for _case in ("vit_b16", "resnet50"):
    SECTION.number(f"gpu_{_case}_peak_gb", cell("{:s2} vs {:s2}", _g(_case, "fp32", impl_value("influencelab", _peak_gb)),
                                                _g(_case, "fp32", impl_value("kronfluence", _peak_gb))))
SECTION.number("gpu_resnet18_kronfluence_self_s", cell("{:d}", _g("resnet18", "fp32",
                                                                  impl_value("kronfluence", "self_s"))))
SECTION.number("gpu_cnn_bf16_ratio_run2", cell("{:.2}", _g("cnn", "bf16", peer_ratio("fit_self_s"), run=2)))
SECTION.number("gpu_cnn_bf16_ratio_run1", cell("{:.2}", _g("cnn", "bf16", peer_ratio("fit_self_s"))))


def _tests_passed() -> str:
    """"10 of 11": the CUDA tests passed, from pytest's last line in tests.log."""
    last = re.findall(r"^(?:(\d+) failed, )?(\d+) passed", path(_TESTS_LOG).read_text(), re.MULTILINE)[-1]
    failed, passed = int(last[0] or 0), int(last[1])
    return f"{passed} of {passed + failed}"


def _cg_cuda_difference() -> str:
    """CG's relative difference CUDA vs CPU, as the failing assertion in tests.log printed it."""
    (x,) = re.findall(r"where ([0-9.e-]+) = _rel\(", path(_TESTS_LOG).read_text())
    return fmt(float(x), "%1")


SECTION.number("gpu_cuda_tests_passed", _tests_passed)
SECTION.number("gpu_cg_cuda_difference", _cg_cuda_difference)

"""Section 6 of RESULTS.md: benchmarks (benchmarks/bench_*.py, their CSVs in benchmarks/results/). Tables whose
rows are the measurements a CSV holds build them when rendered; a missing CSV gives an empty table."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd
from tables_engine import Cell, Ref, Section, cell, exists, fmt, load, ref, ref1

SECTION = Section("6. Benchmarks")

# LiSSA against dattri (python benchmarks/bench_lissa.py; rows: influencelab shared / per query, dattri's modes)
_LI = "benchmarks/results/lissa.csv"


def _li(key: str, impl: str, mode: str, batches: str) -> Ref:
    return ref(_LI, key, implementation=impl, mode=mode, batch_convention=batches)


SECTION.table("lissa_dattri", ["implementation", "autodiff", "batches", "query IHVPs s (recursion alone)",
                               "ours / fastest dattri (recursion alone)"], [
    ["influencelab", "fwd-over-rev", "one stream shared by the 10 queries",
     cell("{:.2} ({:.2})", _li("seconds", "influencelab", "fwd-over-rev", "shared"),
          _li("solve_seconds", "influencelab", "fwd-over-rev", "shared")),
     cell("**{:.2}** ({:.2})", _li("ratio_vs_dattri_fastest", "influencelab", "fwd-over-rev", "shared"),
          _li("solve_ratio_vs_dattri_fastest", "influencelab", "fwd-over-rev", "shared"))],
    ["influencelab", "fwd-over-rev", "per query (10 calls)",
     cell("{:.2} ({:.2})", _li("seconds", "influencelab", "fwd-over-rev", "per-query"),
          _li("solve_seconds", "influencelab", "fwd-over-rev", "per-query")),
     cell("**{:.2}** ({:.2})", _li("ratio_vs_dattri_fastest", "influencelab", "fwd-over-rev", "per-query"),
          _li("solve_ratio_vs_dattri_fastest", "influencelab", "fwd-over-rev", "per-query"))],
    ["dattri 0.3.0", "rev-rev", "per query", cell("{:.2}", _li("seconds", "dattri 0.3.0", "rev-rev", "per-query")),
     cell("{:.2} (the fastest mode here)", _li("ratio_vs_dattri_fastest", "dattri 0.3.0", "rev-rev", "per-query"))],
    ["dattri 0.3.0", "rev-fwd", "per query", cell("{:.2}", _li("seconds", "dattri 0.3.0", "rev-fwd", "per-query")),
     cell("{:.2}", _li("ratio_vs_dattri_fastest", "dattri 0.3.0", "rev-fwd", "per-query"))],
], "6: LiSSA against dattri, both batch conventions")


# EK-FAC vs kronfluence on the CPU: `python benchmarks/bench_ekfac.py --n 20000,60000 --strategies ekfac
# --denormals flush,keep --compression` (one row per implementation, n, strategy and denormal setting)
_EK = "benchmarks/results/ekfac.csv"


def impl_value(impl: str, col: str | Callable[[pd.Series], Any]) -> Callable[[pd.DataFrame], Any]:
    """A value of the selected measurement's ``impl`` row (NaN when it failed or was skipped)."""
    def get(df: pd.DataFrame) -> Any:
        ok = df[(df["impl"] == impl) & df["fit_s"].notna()]
        if len(ok) != 1:
            return math.nan
        row = ok.iloc[0]
        return col(row) if callable(col) else row[col]
    return get


def peer_ratio(col: str | Callable[[pd.Series], Any]) -> Callable[[pd.DataFrame], Any]:
    """Ours over kronfluence's ``col`` of the selected measurement."""
    return lambda df: impl_value("influencelab", col)(df) / impl_value("kronfluence", col)(df)


def _fit_self(row: pd.Series) -> float:
    return row["fit_s"] + row["self_s"]


def ekfac_rows(src: str = _EK) -> list[list[str | Cell]]:
    rows: list[list[str | Cell]] = []
    if not exists(src):
        return rows
    df = load(src)
    for _, r in df[df["impl"] == "influencelab"].iterrows():
        w = dict(n=r["n"], strategy=r["strategy"], denormals=r["denormals"])

        def R(key: Callable[[pd.DataFrame], Any], w: dict = w) -> Ref:
            return ref(src, key, **w)

        rows.append([f"{int(r['n']):,}", {"flush": "flushed", "keep": "kept (PyTorch's default)"}[r["denormals"]],
                     cell("{:s3} / {:s3}", R(impl_value("influencelab", _fit_self)),
                          R(impl_value("kronfluence", _fit_self))),
                     cell("**{:.2}**", R(peer_ratio(_fit_self))),
                     cell("{:s3} / {:s3}", R(impl_value("influencelab", "pairwise_s")),
                          R(impl_value("kronfluence", "pairwise_s"))),
                     cell("**{:.2}**", R(peer_ratio("pairwise_s"))),
                     cell("{:,0} / {:,0}", R(impl_value("influencelab", "peak_pairwise_mb")),
                          R(impl_value("kronfluence", "peak_pairwise_mb"))),
                     cell("{:.4} / {:.6}", R(impl_value("kronfluence", "spearman_self")),
                          R(impl_value("kronfluence", "spearman_pairwise")))])
    return rows


SECTION.table("ekfac_cpu", ["n_train", "subnormal floats", "fit + self s: ours / kronfluence", "ratio (target ≤ 0.5)",
                            "pairwise s: ours / kronfluence", "ratio (target ≤ 0.5)",
                            "pairwise peak RSS above start, MB: ours / kronfluence", "Spearman self / pairwise"],
              ekfac_rows, "6: EK-FAC vs kronfluence on 2 CPU cores, FashionMNIST CNN, 100 queries")

_EKC = "benchmarks/results/ekfac_compression.csv"
SECTION.table("ekfac_compression", ["score.query_rank", "pairwise s", "query matrix MB", "Spearman vs full",
                                    "Pearson vs full"],
              [[str(r), cell("{:s2}", ref(_EKC, "pairwise_s", query_rank=r)),
                cell("{:.1}", ref(_EKC, "query_matrix_mb", query_rank=r)),
                cell("{:.4}", ref(_EKC, "spearman_vs_full", query_rank=r)),
                cell("{:.4}", ref(_EKC, "pearson_vs_full", query_rank=r))] for r in ("full", 64, 32, 8)],
              "6: low-rank query compression vs full rank (bench_ekfac.py --compression)")


# Pairwise scoring on the path users run: `python benchmarks/bench_pairwise_path.py --n 20000,60000` (issue 31 item
# 5; one row per n, subnormal setting and path: cli / api / kronfluence)
_PP = "benchmarks/results/pairwise_path.csv"
_PATHS = {"cli": "CLI: the pairwise stage (`time/pairwise_s`, a fresh process)", "api": "API: `Attributor.pairwise`",
          "kronfluence": "kronfluence: `compute_pairwise_scores`"}


def pairwise_path_rows(src: str = _PP) -> list[list[str | Cell]]:
    if not exists(src):
        return []
    rows: list[list[str | Cell]] = []
    for _, r in load(src).iterrows():
        w = dict(n=r["n"], denormals=r["denormals"], path=r["path"])
        rows.append([f"{int(r['n']):,}", {"flush": "flushed", "keep": "kept (PyTorch's default)"}[r["denormals"]],
                     _PATHS[r["path"]], cell("{:s3}", ref(src, "pairwise_s", **w)),
                     r["runs_s"].replace(";", ", "),
                     "1" if r["path"] == "kronfluence" else cell("**{:.2}**", ref(src, "ratio_vs_kronfluence", **w)),
                     cell("{:.4}", ref(src, "spearman_vs_kronfluence", **w))])
    return rows


SECTION.table("pairwise_path", ["n_train", "subnormal floats", "path", "pairwise s (median of 3)", "runs (s)",
                                "ratio to kronfluence (target ≤ 0.5)", "Spearman vs kronfluence"],
              pairwise_path_rows, "6: the pairwise figure users see: CLI, API and kronfluence back to back")


# Subnormal floats: `python benchmarks/bench_subnormal.py`
_SN = "benchmarks/results/subnormal.csv"


def subnormal_rows(src: str = _SN) -> list[list[str | Cell]]:
    if not exists(src):
        return []
    mm = "matmul_2048x1568x1568"
    return [[f"`[2048 × 1568] @ [1568 × 1568]`, {inputs} inputs",
             *(cell("{:g2} s", ref(src, "seconds", measurement=mm, denormals=d, inputs=inputs))
               for d in ("keep", "flush"))] for inputs in ("normal", "subnormal")]


def _factor_count(impl: str, n: int, only: str | None = None) -> Callable[[pd.DataFrame], Any]:
    def get(df: pd.DataFrame) -> Any:
        sel = df[(df["measurement"] == "ekfac_factors") & (df["impl"] == impl) & (df["n_train"] == n)]
        if only is not None:
            sel = sel[sel["factor"] == only]
        return sel["subnormal_entries"].sum() if len(sel) else math.nan
    return get


def subnormal_model_rows(src: str = _SN) -> list[list[str | Cell]]:
    if not exists(src):
        return []
    df = load(src)
    grads = df[df["measurement"] == "trained_cnn_per_sample_gradients"]

    def share(n: int) -> Callable[[pd.DataFrame], Any]:
        return lambda d: d.loc[(d["measurement"] == "trained_cnn_per_sample_gradients") & (d["n_train"] == n),
                               "share_points_subnormal"].squeeze()

    return [[f"{n:,}", cell("{:%1}", ref(src, share(n))),
             cell("{:,0}", ref(src, _factor_count("kronfluence", n))),
             cell("{:,0}", ref(src, _factor_count("kronfluence", n, "activation_eigenvectors/7"))),
             cell("{:,0}", ref(src, _factor_count("influencelab", n)))]
            for n in grads["n_train"].astype(int)]


SECTION.table("subnormal", ["float32 product", "PyTorch's default", "flush-denormal"], subnormal_rows,
              "6: a float32 product on normal and subnormal inputs, per floating-point mode")
SECTION.table("subnormal_factors", ["CNN trained on (points)",
                                    "training points with a subnormal per-sample gradient entry",
                                    "subnormal entries in kronfluence's EK-FAC factors",
                                    "of which in its Linear(1568, 64) input eigenvectors",
                                    "subnormal entries in influencelab's EK-FAC factors"],
              subnormal_model_rows, "6: where the subnormal floats are: the fitted factors, not the gradients")


# Scaling in n_train through the CLI: `python benchmarks/bench_scaling.py`
_SC = "benchmarks/results/scaling.csv"


def _per_point(stage: str, n: int) -> Callable[[pd.DataFrame], float]:
    """Seconds per training point of ``stage`` at ``n`` relative to the smallest size's."""
    def get(df: pd.DataFrame) -> float:
        base = df.loc[df["n_train"].idxmin()]
        row = df[df["n_train"] == n].iloc[0]
        return (row[f"{stage}_s"] / n) / (base[f"{stage}_s"] / base["n_train"])
    return get


def scaling_rows(src: str = _SC) -> list[list[str | Cell]]:
    if not exists(src):
        return []
    return [[f"{n:,}", *(cell("{:s3} ({:.2})", ref(src, f"{st}_s", n_train=n), ref(src, _per_point(st, n)))
                         for st in ("fit", "self", "pairwise")),
             cell("{:,0}", ref(src, "peak_rss_mb", n_train=n))]
            for n in load(src)["n_train"].astype(int)]


SECTION.table("scaling", ["n_train", "fit s (per point vs smallest)", "self s", "pairwise s",
                          "peak RSS MB (process)"],
              scaling_rows, "6: EK-FAC stage times through the CLI against n_train (bench_scaling.py)")


# CG's GGN products, jvp/vjp vs cached Jacobians: `python benchmarks/bench_cg_products.py`
_CGP = "benchmarks/results/cg_products.csv"


def _pays_off(df: pd.DataFrame) -> str:
    """After how many products forming the Jacobians has paid for itself ("never" where they are not faster)."""
    x = float(df["break_even_products"].iloc[0])
    return "never" if math.isinf(x) else fmt(x, ".1")


def cg_products_rows(src: str = _CGP) -> list[list[str | Cell]]:
    return [[str(k), cell("{:s3}", ref(src, "jvp_s", k=k)), cell("{:s3}", ref(src, "jacobian_form_s", k=k)),
             cell("{:s3}", ref(src, "jacobian_s", k=k)), cell("**{:.2}×**", ref(src, "speedup", k=k)),
             cell("{}", ref(src, _pays_off, k=k)), cell("{:e2}", ref(src, "rel_diff", k=k))]
            for k in load(src)["k"].astype(int)]


SECTION.table("cg_products", ["vectors per product (k)", "jvp/vjp s per product", "Jacobians: form once (s)",
                              "then s per product", "speed-up", "pays off after (products)", "relative difference"],
              cg_products_rows, "6: CG's exact GGN products on the section 3 CNN, 500 points (bench_cg_products.py)")

# Damping sweeps through the CLI: `python benchmarks/bench_pipeline.py --n 2000 --note "..."`
_PL = "benchmarks/results/pipeline.csv"
_PL_RUNS = [("one damping", "one damping (fit + self + pairwise)"),
            ("5 dampings as a list (`'solver.damping=[1e-5,1e-4,1e-3,1e-2,1e-1]'`), one run",
             "5 dampings as a list, one run"),
            ("5 dampings as a multirun (`-m solver.damping=1e-5,...`)", "5 dampings as a multirun (cached factors)")]
SECTION.table("pipeline", ["run", "wall s", "ratio vs one"],
              [[label, cell("{:.1}", ref(_PL, "wall_s", run=run)),
                cell("**{:.2}**" if i else "{:.2}", ref(_PL, "ratio_vs_one", run=run))]
               for i, (label, run) in enumerate(_PL_RUNS)],
              "6: one damping vs five as a list vs five as a multirun (bench_pipeline.py)")


# EK-FAC on a conv-heavy net (ResNet-18), before/after issue #18: `python benchmarks/bench_resnet.py`
_R18 = "benchmarks/results/resnet18_ekfac.csv"


def r18_row(label: str, run: str) -> list[str | Cell]:
    def R(key: str) -> Ref:
        return ref(_R18, key, run=run)

    return [label, cell("{:s2}", R("train_s_per_epoch")), cell("{:s3}", R("fit_s")), cell("{:s3}", R("self_s")),
            cell("**{:.1}**", R("fit_plus_self_epochs")), cell("{:,0}", R("peak_rss_mb")),
            cell("{:s2} / {:s2} / {:s3}", R("covariances_s"), R("eigh_s"), R("correction_s")),
            cell("{:.4}", R("spearman_vs_baseline"))]


SECTION.table("resnet18_ekfac", ["ekfac.py", "train s / epoch", "fit s", "self s",
                                 "fit + self in epochs (target ≤ 10)", "peak RSS MB (target ≤ 4,000)",
                                 "covariances / eigh / correction s", "Spearman vs before"],
              [r18_row("before (2c92a3e)", "before"), r18_row("after", "after")],
              "6: EK-FAC fit + self on ResNet-18, FashionMNIST 2,000 points, before/after #18")

# ---------------------------------------------------------------------------------------------------------------
# prose numbers (RESULTS.md's text quotes them as <!-- num:NAME -->...<!-- /num -->)


def _ek(n: int, denormals: str, key: Callable[[pd.DataFrame], Any]) -> Ref:
    return ref(_EK, key, n=n, strategy="ekfac", denormals=denormals)


for _n in (20000, 60000):
    for _d in ("keep", "flush"):
        SECTION.number(f"ekfac_pairwise_ratio_{_n // 1000}k_{_d}", cell("{:.2}", _ek(_n, _d, peer_ratio("pairwise_s"))))
for _d, _tag in (("flush", "flush"), ("keep", "keep")):
    SECTION.number(f"ekfac_pairwise_per_point_{_tag}", lambda d=_d: fmt(
        (_ek(60000, d, impl_value("influencelab", "pairwise_s")).value() / 60000)
        / (_ek(20000, d, impl_value("influencelab", "pairwise_s")).value() / 20000), ".2"))


def _runs_spread(df: pd.DataFrame) -> str:
    """The range over every measurement of (slowest − fastest) / fastest of its repeated pairwise runs."""
    runs = df["pairwise_runs_s"].dropna().str.split(";").map(lambda v: [float(x) for x in v])
    spread = runs.map(lambda v: (max(v) - min(v)) / min(v))
    return f"{fmt(spread.min(), 'p0')}–{fmt(spread.max(), '%0')}"


SECTION.number("ekfac_pairwise_runs_spread", cell("{}", ref(_EK, _runs_spread)))
SECTION.number("ekfac_pairwise_peak_range", cell("{}", ref(_EK, lambda df: (lambda v: f"{fmt(v.min(), ',0')}–"
                                                                                     f"{fmt(v.max(), ',0')}")(
    df["peak_pairwise_mb"]), impl="influencelab")))

SECTION.number("lissa_scale", cell("{:.1}", ref(_LI, lambda df: df["scale"].iloc[0] if df["scale"].nunique() == 1
                                                 else math.nan)))
SECTION.number("lissa_ratio_shared", cell("{:.2}", _li("ratio_vs_dattri_fastest", "influencelab", "fwd-over-rev",
                                                       "shared")))
SECTION.number("lissa_ratio_per_query", cell("{:.2}", _li("ratio_vs_dattri_fastest", "influencelab", "fwd-over-rev",
                                                          "per-query")))
SECTION.number("lissa_power_iteration_s", cell("{:.1}", _li("fit_seconds", "influencelab", "fwd-over-rev", "shared")))
SECTION.number("lissa_dattri_rel_diff", cell("{:.2}", ref(_LI, lambda df: df["rel_diff"].max(),
                                                          implementation="dattri 0.3.0")))
SECTION.number("lissa_seed1_rel_diff", cell("{:.2}", _li("rel_diff", "influencelab (seed 1)", "fwd-over-rev",
                                                         "shared")))
SECTION.number("lissa_per_query_rel_diff", cell("{:e1}", _li("rel_diff", "influencelab", "fwd-over-rev",
                                                             "per-query")))
SECTION.number("lissa_hvp_rel_diff", cell("{:e1}", ref(_LI, lambda df: df["hvp_rel_diff"].max(),
                                                       implementation="dattri 0.3.0")))
SECTION.number("lissa_residual_max", cell("{:.1}", _li("rel_residual_max", "influencelab", "fwd-over-rev",
                                                       "shared")))
for _name, _impl in (("ours", "influencelab"), ("seed1", "influencelab (seed 1)"), ("dattri", "dattri 0.3.0")):
    SECTION.number(f"lissa_full_residual_{_name}", cell("{:.1}", ref(_LI, lambda df: df["rel_residual_full_max"].max(),
                                                                     implementation=_impl)))


def _per_point_max(df: pd.DataFrame) -> float:
    base = df.loc[df["n_train"].idxmin()]
    return max(((df[f"{st}_s"] / df["n_train"]) / (base[f"{st}_s"] / base["n_train"])).max()
               for st in ("fit", "self", "pairwise"))


SECTION.number("scaling_per_point_max", cell("{:.2}", ref(_SC, _per_point_max)))
SECTION.number("scaling_pairwise_20k_60k", lambda: fmt(ref(_SC, _per_point("pairwise", 60000)).value()
                                                       / ref(_SC, _per_point("pairwise", 20000)).value(), ".2"))
SECTION.number("scaling_rss_growth", cell("{:,0}", ref(_SC, lambda df: df.loc[df["n_train"].idxmax(), "peak_rss_mb"]
                                                       - df.loc[df["n_train"].idxmin(), "peak_rss_mb"])))
SECTION.number("cg_products_pays_off_8", cell("{:d}", ref(_CGP, "break_even_products", k=8)))
SECTION.number("cg_products_speedup_8", cell("{:.1}", ref(_CGP, "speedup", k=8)))
SECTION.number("cg_products_speedup_100", cell("{:d}", ref(_CGP, "speedup", k=100)))
_PLM = [ref(_PL, key, measurement="pairwise_peak_memory", n_train=n) for key in ("peak_rss_mb",)
        for n in (500, 1000, 2000)]
SECTION.number("pipeline_peak_rss", cell("{:,0} / {:,0} / {:,0}", *_PLM))
SECTION.number("pipeline_n_x_params", cell("{:d} → {:d}", *(ref(_PL, "n_train_x_params_mb",
                                                                measurement="pairwise_peak_memory", n_train=n)
                                                            for n in (500, 2000))))

# the sweep machinery under load (issue 32 item 5): benchmarks/results/sweep_load.csv, one summary row
for _name, _col in (("sl_jobs", "jobs"), ("sl_kills", "kills"), ("sl_kills_mid_write", "kills_mid_write"),
                    ("sl_invocations", "invocations"), ("sl_lost", "lost_jobs"), ("sl_stray", "stray_files"),
                    ("sl_temps", "temp_files_left_by_kills")):
    SECTION.number(_name, cell("{:d}", Ref("benchmarks/results/sweep_load.csv", _col, one=True)))
SECTION.number("sl_mismatches", cell("{:d}", Ref("benchmarks/results/sweep_load.csv", lambda df: int(
    df[["metric_mismatches", "score_file_mismatches", "cache_mismatches"]].to_numpy().sum()))))


# peak CPU memory of EK-FAC's fit, self and pairwise against kronfluence (python benchmarks/bench_memory.py; issue 31
# item 3): the first run (memory_cpu_before.csv: ResNet-50 only) and the latest (memory_cpu.csv)
_MEM = {"before": "benchmarks/results/memory_cpu_before.csv", "after": "benchmarks/results/memory_cpu.csv"}
_MODEL_NAMES = {"resnet50": "ResNet-50", "vit_b16": "ViT-B/16"}


def _mem(which: str, model: str, precision: str, impl: str, phase: str, key: str = "peak_inc_mb") -> Ref:
    return ref1(_MEM[which], key, model=model, precision=precision, impl=impl, phase=phase)


def _mem_ratio(which: str, model: str, precision: str, phase: str, key: str = "peak_inc_mb") -> Ref:
    def get(df: pd.DataFrame) -> str:
        sel = df[(df["model"] == model) & (df["precision"] == precision) & (df["phase"] == phase)]
        il = float(sel[sel["impl"] == "influencelab"][key].iloc[0])
        kf = float(sel[sel["impl"] == "kronfluence"][key].iloc[0])
        return fmt(il / kf, ".2")
    return Ref(_MEM[which], get)


def _mem_pair(which: str, model: str, precision: str, phase: str) -> bool:
    if not exists(_MEM[which]):
        return False
    df = load(_MEM[which])
    have = df[(df["model"] == model) & (df["precision"] == precision) & (df["phase"] == phase)]
    return set(have["impl"]) == {"influencelab", "kronfluence"}


def _mem_rows() -> list[list[Any]]:
    rows: list[list[Any]] = []
    if not exists(_MEM["after"]):
        return rows
    for model in ("resnet50", "vit_b16"):
        for precision in ("fp32", "bf16"):
            for phase in ("fit", "self", "pairwise"):
                if not _mem_pair("after", model, precision, phase):
                    continue
                before: Any = (cell("{:.2}", _mem_ratio("before", model, precision, phase))
                               if _mem_pair("before", model, precision, phase) else "–")
                agree = ("–" if phase == "fit" else
                         cell("{:.3} / {:.3}", _mem("after", model, precision, "influencelab", phase,
                                                 "spearman_vs_kronfluence"),
                              _mem("after", model, precision, "influencelab", phase, "spearman_vs_fp32"))
                         if precision == "bf16" else
                         cell("{:.3}", _mem("after", model, precision, "influencelab", phase,
                                            "spearman_vs_kronfluence")))
                rows.append([f"{_MODEL_NAMES[model]} {phase} {precision}", before,
                             cell("{:,0} / {:,0}", _mem("after", model, precision, "influencelab", phase),
                                  _mem("after", model, precision, "kronfluence", phase)),
                             cell("**{}**", _mem_ratio("after", model, precision, phase)),
                             cell("{}", _mem_ratio("after", model, precision, phase, "seconds")), agree])
    return rows


def _mem_span(phases: tuple[str, ...], models: tuple[str, ...] = ("resnet50", "vit_b16"),
              key: str = "peak_inc_mb") -> Callable[[pd.DataFrame], str]:
    """The range over models and precisions of influencelab / kronfluence (``key``) for ``phases``."""
    def get(df: pd.DataFrame) -> str:
        r = []
        for _, sel in df[df["model"].isin(models) & df["phase"].isin(phases)].groupby(
                ["model", "precision", "phase"]):
            if set(sel["impl"]) == {"influencelab", "kronfluence"}:
                r.append(float(sel[sel["impl"] == "influencelab"][key].iloc[0])
                         / float(sel[sel["impl"] == "kronfluence"][key].iloc[0]))
        return f"{fmt(min(r), '.2')}–{fmt(max(r), '.2')}"
    return get


def _bf16_agreement(df: pd.DataFrame) -> str:
    v = df[(df["impl"] == "influencelab") & (df["precision"] == "bf16")]["spearman_vs_fp32"].dropna()
    return f"{fmt(v.min(), '.3')}–{fmt(v.max(), '.3')}"


for _name, _phases in (("fit", ("fit",)), ("self", ("self",)), ("pairwise", ("pairwise",))):
    SECTION.number(f"mem_{_name}_ratio_span", cell("{}", Ref(_MEM["after"], _mem_span(_phases))))
SECTION.number("mem_bf16_agreement", cell("{}", Ref(_MEM["after"], _bf16_agreement)))

# influencelab's side again after CPU passes moved to channels-last order (2026-12-06; kronfluence's is unchanged):
# `OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --impls influencelab --out <_MEM_CL>`
_MEM_CL = "benchmarks/results/memory_cpu_channels_last.csv"


def _mem_cl(against: str) -> Callable[[pd.DataFrame], str]:
    """The range over models, precisions and phases of the channels-last peak / ``against``'s peak in memory_cpu.csv
    (``influencelab``: the change; ``kronfluence``: the ratio of the table above, again)."""
    def get(df: pd.DataFrame) -> str:
        old = load(_MEM["after"])
        r = []
        for _, row in df.iterrows():
            sel = old[(old["model"] == row["model"]) & (old["precision"] == row["precision"])
                      & (old["phase"] == row["phase"]) & (old["impl"] == against)]
            r.append(float(row["peak_inc_mb"]) / float(sel["peak_inc_mb"].iloc[0]))
        if against == "influencelab":
            return f"{fmt(100 * (min(r) - 1), '+.1')}% to {fmt(100 * (max(r) - 1), '+.1')}%"
        return f"{fmt(min(r), '.2')}–{fmt(max(r), '.2')}"
    return get


for _against in ("influencelab", "kronfluence"):
    SECTION.number(f"mem_channels_last_vs_{_against}", cell("{}", Ref(_MEM_CL, _mem_cl(_against))))


SECTION.table("memory_cpu", ["model, phase, precision", "first run: ratio", "peak RSS increase MB, influencelab / "
                             "kronfluence", "ratio", "wall-time ratio (loaded machine)",
                             "Spearman of scores vs kronfluence fp32 (bf16: / vs own fp32)"], _mem_rows,
              "6: peak CPU memory against kronfluence (bench_memory.py)")


def _pp(n: int, path: str, col: str) -> Ref:
    return ref(_PP, col, n=n, denormals="keep", path=path)


for _n in (20000, 60000):
    for _p in ("cli", "api"):
        SECTION.number(f"pairwise_path_{_p}_{_n // 1000}k", cell("{:.2}", _pp(_n, _p, "ratio_vs_kronfluence")))
    SECTION.number(f"pairwise_path_kron_{_n // 1000}k", cell("{:s3}", _pp(_n, "kronfluence", "pairwise_s")))
    SECTION.number(f"pairwise_path_cli_s_{_n // 1000}k", cell("{:s3}", _pp(_n, "cli", "pairwise_s")))
    SECTION.number(f"pairwise_path_api_s_{_n // 1000}k", cell("{:s3}", _pp(_n, "api", "pairwise_s")))
# the same 60,000-point run, back to back, by the code before the pass ran in channels-last order (NCHW)
_PPN = "benchmarks/results/pairwise_path_nchw.csv"
for _p in ("cli", "api"):
    SECTION.number(f"pairwise_path_nchw_{_p}_60k", cell("{:.2}", ref(_PPN, "ratio_vs_kronfluence", n=60000, path=_p)))
    SECTION.number(f"pairwise_path_nchw_{_p}_s_60k", cell("{:s3}", ref(_PPN, "pairwise_s", n=60000, path=_p)))
SECTION.number("pairwise_path_nchw_kron_60k", cell("{:s3}", ref(_PPN, "pairwise_s", n=60000, path="kronfluence")))

"""Print the headline tables of experiments/results/*/report.csv as markdown (used to write RESULTS.md).

    python experiments/summarize.py
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from influencelab.run import first_damping, split_dampings

RESULTS = Path(__file__).parent / "results"


def rows(name: str) -> list[dict[str, str]]:
    path = RESULTS / name / "report.csv"
    return list(csv.DictReader(open(path))) if path.exists() else []


def f(v: str | None, pct: bool = False) -> str:
    if v in (None, ""):
        return "–"
    x = float(v)
    return f"{x:.0%}" if pct else f"{x:.3f}"


def run_label(r: dict[str, str], keys: tuple[str, ...] = ("solver", "solver.curvature", "solver.modules", "seed")) -> str:
    """What distinguishes a job of a sweep: those of ``keys`` it overrides."""
    return ", ".join(f"{k}={r[k]}" for k in keys if r.get(k))


def mislabel(name: str) -> None:
    rs = rows(name)
    if not rs:
        return
    r0 = rs[0]
    print(f"\n#### {name}: test accuracy {f(r0['train/test_accuracy'])}, accuracy on the (noisy) training labels "
          f"{f(r0['train/train_accuracy'])}\n")
    print("| ranking | top 10% | top 20% | top 30% | top 50% | curve AUC | ROC AUC | AP | time fit+self s |")
    print("|---|---|---|---|---|---|---|---|---|")
    seen = set()
    for r in rs:
        for method in ("self_influence", "identity", "loss", "random"):
            label = (f"self-influence ({run_label(r) or 'preset solver'})" if method == "self_influence"
                     else f"{method} ({run_label(r, ('seed',))})" if r.get("seed") else method)
            if method == "identity" and r.get("solver") == "identity":
                continue
            if label in seen or f"mislabel/{method}/recall@10" not in r or r[f"mislabel/{method}/recall@10"] == "":
                continue
            seen.add(label)
            t = (f"{float(r['time/fit_s']) + float(r['time/self_s']):.1f}" if method == "self_influence"
                 and r.get("time/self_s") else "")
            print(f"| {label} | " + " | ".join(f(r[f"mislabel/{method}/recall@{p}"], True) for p in (10, 20, 30, 50))
                  + f" | {f(r[f'mislabel/{method}/curve_auc'])} | {f(r[f'mislabel/{method}/roc_auc'])} | "
                  f"{f(r[f'mislabel/{method}/ap'])} | {t} |")


def ihvp(name: str) -> None:
    rs = rows(name)
    if not rs:
        return
    print(f"\n#### {name}\n\n| solver | damping | relative error vs CG | cosine | wall time s (fit + apply) |\n|---|---|---|---|---|")
    for r in sorted(rs, key=lambda r: (r.get("solver", ""), float(r.get("ihvp/damping") or 0))):
        print(f"| {r.get('ihvp/solver')} | {r.get('ihvp/damping')} | {f(r.get('ihvp/rel_error'))} | "
              f"{f(r.get('ihvp/cosine'))} | {f(r.get('ihvp/time_s'))} |")


def lds(name: str) -> None:
    rs = rows(name)
    if not rs:
        return
    print(f"\n#### {name}\n\n| run | LDS (loss) mean ± std | 95% CI | LDS (margin) | ground truth s |\n|---|---|---|---|---|")
    for r in rs:
        label = ", ".join(f"{k}={v}" for k, v in r.items() if k in ("solver", "solver.damping", "lds.seeds_per_subset"))
        print(f"| {label} | {f(r.get('lds/mean'))} ± {f(r.get('lds/std'))} | [{f(r.get('lds/ci_low'))}, "
              f"{f(r.get('lds/ci_high'))}] | {f(r.get('lds_margin/mean'))} | {f(r.get('time/lds_truth_s'))} |")


def by_damping(name: str) -> pd.DataFrame | None:
    """The report as a DataFrame of one row per job and damping (:func:`influencelab.run.split_dampings`: a
    damping list's ``.../name@<λ>`` columns as ``.../name`` on the row of λ, the first damping's from the bare
    names), cells as the CSV writes them (empty: ``None``); ``None`` without a report."""
    path = RESULTS / name / "report.csv"
    if not path.exists():
        return None
    wide = pd.read_csv(path, dtype=str, keep_default_na=False)
    return split_dampings(wide.mask(wide == ""), first="solver.damping").astype(object)


def mislabel_damping(name: str) -> None:
    """Per-damping recall of self-influence (every damping of a list from one fit and one scoring pass)."""
    df = by_damping(name)
    if df is None:
        return
    df = df[df["mislabel/self_influence/recall@10"].notna()]
    first = df.get("solver.damping", pd.Series(None, index=df.index, dtype=object)).map(first_damping)
    df = df.assign(damping=df["damping"].where(df["damping"].notna(), first))  # a job of one damping: its own
    # each job's rows: its first damping (the list's first), then the others in increasing order
    df = df.assign(_job=pd.factorize(df["job"])[0], _later=df["damping"] != first)
    df = df.sort_values(["_job", "_later"], kind="stable")
    print(f"\n#### {name}: test accuracy {f(df['train/test_accuracy'].iloc[0])}\n")
    print("| run | damping | top 10% | top 20% | ROC AUC | AP |\n|---|---|---|---|---|---|")
    m = "mislabel/self_influence/"
    for r in (row.dropna().to_dict() for _, row in df.iterrows()):
        print(f"| {run_label(r) or 'defaults'} | {float(r['damping']):g} | {f(r[m + 'recall@10'], True)} | "
              f"{f(r[m + 'recall@20'], True)} | {f(r[m + 'roc_auc'])} | {f(r[m + 'ap'])} |")


def unlearn(name: str) -> None:
    """Edited (one Newton step) vs fine-tuned vs retrained, per job."""
    rs = rows(name)
    if not rs:
        return
    print(f"\n#### {name}\n")
    print("| mode | selection | points (flipped) | solver | damping | test acc orig / edit / ft / retrain | "
          "set loss orig / edit / retrain | set acc orig / edit / retrain | agreement edit / ft / orig | "
          "KL edit / orig | param dist edit | edit s / retrain s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rs:
        u = "unlearn/"

        def g(m: str, k: str, r: dict[str, str] = r) -> str:
            return f(r.get(f"unlearn/{m}/{k}"))
        print(f"| {r.get('unlearn.mode') or 'remove'} | {r.get('unlearn.selection') or ''} | "
              f"{r[u + 'n_points']} ({r[u + 'n_flipped_in_set']}) | {r.get('solver') or 'ekfac'} | "
              f"{r.get('solver.damping') or ''} | "
              + " / ".join(g(m, "test_accuracy") for m in ("original", "edited", "finetuned", "retrained")) + " | "
              + " / ".join(g(m, "set_loss") for m in ("original", "edited", "retrained")) + " | "
              + " / ".join(g(m, "set_accuracy") for m in ("original", "edited", "retrained")) + " | "
              + " / ".join(g(m, "agreement") for m in ("edited", "finetuned", "original")) + " | "
              + " / ".join(g(m, "kl_to_retrained") for m in ("edited", "original")) + " | "
              + g("edited", "param_dist_rel") + " | "
              + f"{float(r['time/unlearn_edit_s']):.2f} / {float(r['time/unlearn_retrain_s']):.1f} |")


if __name__ == "__main__":
    for n in ("mislabel_standard", "mislabel_memorize", "mislabel_memorize_full", "mislabel_small", "mislabel_lissa"):
        mislabel(n)
    for n in ("mislabel_damping", "mislabel_damping_high", "mislabel_damping_seed1", "mislabel_small",
              "mislabel_lissa", "mislabel_memorize_full"):
        mislabel_damping(n)
    for n in ("ihvp_cnn", "ihvp_depth"):
        ihvp(n)
    for n in ("lds", "lds_damping", "lds_seeds"):
        lds(n)
    for n in ("unlearn_remove", "unlearn_repair", "unlearn_solvers", "unlearn_fmnist", "clean_pipeline",
              "clean_pipeline_fmnist"):
        unlearn(n)

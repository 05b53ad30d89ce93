"""Print the headline tables of experiments/results/*/report.csv as markdown (used to write RESULTS.md).

    python experiments/summarize.py
"""

from __future__ import annotations

import csv
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def rows(name: str) -> list[dict[str, str]]:
    path = RESULTS / name / "report.csv"
    return list(csv.DictReader(open(path))) if path.exists() else []


def f(v: str | None, pct: bool = False) -> str:
    if v in (None, ""):
        return "–"
    x = float(v)
    return f"{x:.0%}" if pct else f"{x:.3f}"


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
            label = f"self-influence ({r['solver']})" if method == "self_influence" else method
            if method == "identity" and r["solver"] == "identity":
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


if __name__ == "__main__":
    for n in ("mislabel_standard", "mislabel_memorize", "mislabel_lissa"):
        mislabel(n)
    ihvp("ihvp_cnn")
    for n in ("lds", "lds_damping", "lds_seeds"):
        lds(n)

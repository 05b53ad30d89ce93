"""Section 5c of RESULTS.md: detect-then-fix, from the committed report.csv files of `run clean_pipeline*`
(experiments/run_here.sh). Writes experiments/results/clean_pipeline_summary.csv (test accuracy of each model with
a 95% Wilson interval over the test set) and prints the markdown table.

    .venv/bin/python experiments/clean_pipeline_table.py
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from scipy.stats import binomtest

RESULTS = Path(__file__).parent / "results"
#: data -> (sweep dirs, test-set size: digits' stratified 20% split, FashionMNIST's full test split)
RUNS = {"digits": (("clean_pipeline", "clean_pipeline_repair_to"), 360),
        "FashionMNIST": (("clean_pipeline_fmnist", "clean_pipeline_fmnist_repair_to"), 10_000)}
MODELS = ("original", "edited", "finetuned", "retrained")


def wilson(acc: float, n: int) -> tuple[float, float]:
    k = round(acc * n)
    assert abs(k - acc * n) < 1e-6 * n, (acc, n)  # an accuracy over exactly n test points
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return ci.low, ci.high


def main() -> None:
    rows = []
    for data, (sweeps, n_test) in RUNS.items():
        for sweep in sweeps:
            df = pd.read_csv(RESULTS / sweep / "report.csv")
            for _, r in df.iterrows():
                mode = r["unlearn.mode"]
                rule = "" if mode == "remove" else r.get("unlearn.repair_to") if isinstance(
                    r.get("unlearn.repair_to"), str) else "prediction"
                row = {"data": data, "mode": mode, "repair_to": rule, "source": f"{sweep}/report.csv",
                       "n_points": int(r["unlearn/n_points"]), "n_flipped": int(r["unlearn/n_flipped_in_set"]),
                       "n_true_label": int(r["unlearn/n_repaired_to_true_label"]) if mode == "repair" else None}
                for m in MODELS:
                    acc = float(r[f"unlearn/{m}/test_accuracy"])
                    row[m], (row[f"{m}_ci_low"], row[f"{m}_ci_high"]) = acc, wilson(acc, n_test)
                rows.append(row)
    out = pd.DataFrame(rows)
    out.to_csv(RESULTS / "clean_pipeline_summary.csv", index=False, float_format="%.6f")
    print("| data | mode (labels from) | points fixed (flipped; relabelled to the true class) | noisy model "
          "| one Newton step | fine-tune 1 epoch | retrain on cleaned data |")
    print("|---|---|---|---|---|---|---|")
    for _, r in out.iterrows():
        how = "remove" if r["mode"] == "remove" else f"repair ({r['repair_to']}{', upper bound' if r['repair_to'] == 'oracle' else ''})"
        fixed = f"{r['n_points']} ({r['n_flipped']}" + ("" if r["mode"] == "remove" else f"; {int(r['n_true_label'])}") + ")"
        cells = [f"{r[m]:.3f} [{r[f'{m}_ci_low']:.3f}, {r[f'{m}_ci_high']:.3f}]" for m in MODELS]
        print(f"| {r['data']} | {how} | {fixed} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

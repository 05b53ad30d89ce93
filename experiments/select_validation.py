"""Issue 27 item 2: the damping and layers chosen without the flip mask (stage ``select``) against the oracle-best
setting of the same grid, on fresh draws. Writes ``experiments/results/select_validation/<regime>.csv`` (one row per
draw) from two sweeps of ``experiments/run_here.sh``:

* ``select_<regime>``: per draw (``seed``), one job with ``select.objective=injected_flips`` (the selector: λ and
  the tracked layers chosen by how well self-influence finds label flips the *user injects*, on a retrained model)
  and one with ``select.objective=spectrum`` (kronfluence's rule, 0.1 × the mean eigenvalue, all layers);
* ``select_<regime>_grid``: per draw, the same trained model scored at every (λ, layers) of the selector's grid,
  whose recall against the flip mask gives the **oracle**-best setting (what a user without the true labels cannot
  pick; an upper bound for the grid).

Every number compares rankings of the same trained model on the same flipped points, so differences are paired
over the flipped points (:func:`influencelab.evaluation.paired_recall_difference`: 95% bootstrap interval and an
exact McNemar p-value; the oracle-best is a maximum over the grid, so "selected − oracle" is biased against the
selector). The flip mask is read here, after the choice, only to score it.

    python experiments/select_validation.py multirun digits fmnist mnist5k fmnist_memorize
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from influencelab.evaluation import paired_recall_difference, recall_at
from influencelab.run import load_run
from influencelab.sweeps import job_overrides

OUT = Path(__file__).resolve().parent / "results" / "select_validation"


def _key(d: object) -> str:
    """A damping as a comparable key (``auto`` or the float's repr)."""
    return "auto" if str(d) == "auto" else repr(float(d))


def grid_scores(grid_dir: Path) -> dict[int, dict[tuple[str, str], np.ndarray]]:
    """Per draw (seed): ``{(modules, damping key): self-influence [n_train]}`` over the grid's jobs, and the flip
    mask under the key ``("flipped", "")``."""
    out: dict[int, dict[tuple[str, str], np.ndarray]] = {}
    for job in sorted(p for p in grid_dir.iterdir() if (p / ".hydra").is_dir()):
        ov = job_overrides(job)
        seed, modules = int(ov.get("seed", 0)), str(ov.get("solver.modules", "all")).replace("\\", "")
        run = load_run(job)
        s = run.scores("self")
        by = s["scores_by_damping"] if "scores_by_damping" in s else s["scores"][None]
        per = out.setdefault(seed, {})
        for d, row in zip(s["dampings"], by, strict=True):
            per[modules, _key(d)] = row.double().numpy()
        per["flipped", ""] = run.flipped.numpy().astype(bool)
    return out


def choices(select_dir: Path) -> dict[tuple[int, str], dict]:
    """Per (seed, objective): the select job's metrics (its choice, and mislabel metrics at that choice)."""
    out = {}
    for job in sorted(p for p in select_dir.iterdir() if (p / ".hydra").is_dir()):
        ov = job_overrides(job)
        out[int(ov.get("seed", 0)), str(ov["select.objective"])] = json.loads((job / "metrics.json").read_text())
    return out


def validate(root: Path, regime: str) -> pd.DataFrame:
    grids = grid_scores(root / f"select_{regime}_grid")
    picks = choices(root / f"select_{regime}")
    rows = []
    for seed, per in sorted(grids.items()):
        flipped = per.pop(("flipped", ""))

        table = {k: (recall_at(s, flipped, 0.1), float(roc_auc_score(flipped, s))) for k, s in per.items()}
        oracle = max(table, key=lambda k: (table[k][0], table[k][1]))
        row: dict[str, object] = {"regime": regime, "seed": seed, "n_train": len(flipped),
                                  "n_flipped": int(flipped.sum()), "n_settings": len(table),
                                  "oracle_modules": oracle[0], "oracle_damping": oracle[1],
                                  "oracle_recall10": table[oracle][0], "oracle_auc": table[oracle][1]}
        default = ("all", _key(1e-3))
        if default in table:
            row["default_recall10"], row["default_auc"] = table[default]
        for objective, tag in (("injected_flips", "selected"), ("spectrum", "spectrum")):
            m = picks.get((seed, objective))
            if m is None:
                continue
            key = (str(m["select/modules"]), _key(m["select/damping"]))
            row[f"{tag}_modules"], row[f"{tag}_damping"] = key
            row[f"{tag}_lambda"] = float(m["select/lambda"])
            row[f"{tag}_recall10"], row[f"{tag}_auc"] = table[key]
            row["loss_recall10"] = float(m["mislabel/loss/recall@10"])
            row["loss_auc"] = float(m["mislabel/loss/roc_auc"])
            for k in ("", "_ci_low", "_ci_high", "_p"):
                row[f"{tag}_minus_loss10{k}"] = float(m[f"mislabel/self_influence/minus_loss_top10{k}"])
            d = paired_recall_difference(per[key], per[oracle], flipped, 0.1, "d")
            for k in ("", "_ci_low", "_ci_high", "_p"):
                row[f"{tag}_minus_oracle10{k}"] = d[f"d{k}"]
        if "selected_damping" in row and "spectrum_damping" in row:
            sel = (row["selected_modules"], row["selected_damping"])
            spec = (row["spectrum_modules"], row["spectrum_damping"])
            d = paired_recall_difference(per[sel], per[spec], flipped, 0.1, "d")
            for k in ("", "_ci_low", "_ci_high", "_p"):
                row[f"selected_minus_spectrum10{k}"] = d[f"d{k}"]
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="the multirun folder holding select_<regime> and select_<regime>_grid")
    p.add_argument("regimes", nargs="+")
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    for regime in a.regimes:
        if not (a.root / f"select_{regime}_grid").is_dir() or not (a.root / f"select_{regime}").is_dir():
            print(f"{regime}: select_{regime} or select_{regime}_grid missing under {a.root}; skipped",
                  file=sys.stderr)
            continue
        df = validate(a.root, regime)
        df.to_csv(OUT / f"{regime}.csv", index=False)
        cols = ["seed", "selected_modules", "selected_damping", "selected_recall10", "oracle_recall10",
                "selected_minus_oracle10", "spectrum_recall10", "loss_recall10"]
        print(f"{regime}:\n{df[[c for c in cols if c in df]].to_string(index=False)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

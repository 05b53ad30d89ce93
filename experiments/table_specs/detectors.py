"""Section 1h of RESULTS.md: a detector that beats the loss? (#33 item 3). Detectors chosen on one draw
(FashionMNIST 5,000 points, seed 0) and confirmed on fresh draws, each against the loss, paired over the flipped
points: ``experiments/results/detectors_summary.csv``, written by ``python experiments/detectors_summary.py`` from
the ``detectors_*`` sweeps (``bash experiments/run_here.sh detectors_...``), one row per (sweep, seed, solver,
detector). A row is named by its sweep, seed, solver and detector, never by its position."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
from tables_engine import MISSING, Cell, Ref, Section, Sweep, cell, fmt, job, load, ref, ref1

SECTION = Section("1h. A detector that beats the loss? (#33 item 3)")

SUMMARY = "experiments/results/detectors_summary.csv"
EXPLORE = "experiments/results/detectors_fmnist_choose/explore.csv"

# the draws (columns): name -> (header, seed, {kind: sweep}); kind is the family of sweep a detector comes from
CHOOSE = {"tracin": "detectors_fmnist_choose", "trak": "detectors_fmnist_choose",
          "heldout": "detectors_fmnist_choose_heldout", "ekfac": "detectors_fmnist_choose_ekfac",
          "relatif": "detectors_fmnist_choose_ekfac"}  # TracIn and RelatIF were run on the choosing draw only
FMNIST_FRESH = {"trak": "detectors_fmnist_fresh", "heldout": "detectors_fmnist_fresh",
                "ekfac": "detectors_fmnist_fresh_ekfac"}
MNIST5K_FRESH = {"trak": "detectors_mnist5k_fresh", "heldout": "detectors_mnist5k_fresh",
                 "ekfac": "detectors_mnist5k_fresh_ekfac"}
DRAWS = {
    "fmnist0": ("FashionMNIST seed 0 (the choosing draw)", 0, CHOOSE),
    "fmnist1": ("FashionMNIST seed 1 (fresh)", 1, FMNIST_FRESH),
    "fmnist2": ("FashionMNIST seed 2 (fresh)", 2, FMNIST_FRESH),
    "mnist5k1": ("MNIST-5k seed 1 (fresh)", 1, MNIST5K_FRESH),
    "mnist5k2": ("MNIST-5k seed 2 (fresh)", 2, MNIST5K_FRESH),
}
FRESH = ("fmnist1", "fmnist2", "mnist5k1", "mnist5k2")
SOLVER = {"tracin": "tracin", "trak": "trak", "heldout": "trak", "ekfac": "ekfac", "relatif": "ekfac"}
MEMORISED = "detectors_memorize_fresh_ekfac"  # experiment=mislabel_memorize seed=3, EK-FAC at λ = [1e-8, 1e-3]
# the same draw and model, TRAK with the held-out harm over query.n test points (the choice and its parts)
MEMORISED_TRAK = "detectors_memorize_fresh"


def row_of(draw: str, kind: str, detector: str, key: str) -> Ref:
    """Column ``key`` of detector ``detector`` (the mislabel stage's ranking name) of sweep family ``kind`` on
    draw ``draw``."""
    _, seed, sweeps = DRAWS[draw]
    return ref1(SUMMARY, key, sweep=sweeps[kind], seed=seed, solver=SOLVER[kind], detector=detector)


def vs_loss(draw: str, kind: str, detector: str, bold: bool = False) -> Cell | str:
    """"83.4 / +0.2 [-1.8, +2.0]": recall at 10% (points) / this − loss at 10%, paired [95% CI]; the loss itself
    prints its recall only; "–" where the detector was not run on that draw."""
    if kind not in DRAWS[draw][2]:
        return MISSING
    if detector == "loss":
        return cell("{:p1} (the baseline)", row_of(draw, kind, detector, "recall@10"))
    t = "{:p1} / {:+p1} [{:+p1}, {:+p1}]"
    return cell(f"**{t}**" if bold else t, *(row_of(draw, kind, detector, k) for k in (
        "recall@10", "minus_loss_top10", "minus_loss_top10_ci_low", "minus_loss_top10_ci_high")))


_CH, _HO = Sweep("detectors_fmnist_choose"), Sweep("detectors_fmnist_choose_heldout")
# (label, sweep family, detector, bold)
DETECTORS: list[tuple[str | Cell, str, str, bool]] = [
    (cell("TracIn self-influence ({:d} checkpoints)", _CH("trainer.checkpoints", job(solver="tracin"))),
     "tracin", "self_influence", False),
    ("loss + TracIn (rank average)", "tracin", "loss_and_self_influence", False),
    ("TRAK self-influence", "trak", "self_influence", False),
    ("loss + TRAK (rank average)", "trak", "loss_and_self_influence", False),
    (cell("held-out harm (TRAK, {:,0} test queries)", _HO("query.n")), "heldout", "heldout_harm", False),
    ("**loss + held-out harm (rank average): the choice**", "heldout", "loss_and_heldout_harm", True),
    ("EK-FAC self-influence, λ = 1e-3 (solver default)", "ekfac", "self_influence", False),
    ("loss + EK-FAC (rank average)", "ekfac", "loss_and_self_influence", False),
    ("RelatIF (EK-FAC, λ = 1e-3)", "relatif", "relatif", False),
    ("loss + RelatIF (rank average)", "relatif", "loss_and_relatif", False),
    ("gradient norm (identity)", "trak", "identity", False),
    ("loss", "trak", "loss", False),
]
SECTION.table("detectors_vs_loss", ["detector: top 10% / this − loss at 10%, paired [95% CI] (points)",
                                    *(DRAWS[d][0] for d in DRAWS)],
              [[label, *(vs_loss(d, kind, det, bold) for d in DRAWS)] for label, kind, det, bold in DETECTORS],
              "1h: detectors against the loss, chosen on FashionMNIST seed 0, confirmed on fresh draws")

# ---------------------------------------------------------------------------------------------------------------
# the memorised regime's fresh draw (seed 3): the summary's rows, and λ = 1e-3 (the sweep's second damping, which
# the summary leaves out) from the sweep's report.csv; the choice and TRAK from the TRAK sweep on the same model

_MEM, _MEM_TRAK = Sweep(MEMORISED), Sweep(MEMORISED_TRAK)
_MEM_SWEEPS = {"ekfac": MEMORISED, "trak": MEMORISED_TRAK}  # solver -> the memorised draw's sweep


def _first_damping(df: pd.DataFrame) -> str:
    """The first damping of the memorised sweep's ``solver.damping`` list (the one the summary's self-influence
    and its rank average use)."""
    (d,) = df["solver.damping"].astype(str)
    return fmt(float(d.strip("[]").split(",")[0]), "e1")


def _mem(detector: str, key: str | Callable, solver: str = "ekfac") -> Ref:
    return ref1(SUMMARY, key, sweep=_MEM_SWEEPS[solver], seed=3, solver=solver, detector=detector)


def mem_cells(detector: str, solver: str = "ekfac") -> list[Cell | str]:
    """top 10% [Wilson CI], this − loss at 10% paired [95% CI] (McNemar p), from the summary."""
    top = cell("{:%1} [{:p1}, {:p1}]", *(_mem(detector, f"recall@10{x}", solver)
                                         for x in ("", "_ci_low", "_ci_high")))
    if detector == "loss":
        return [top, "(the baseline)"]
    return [top, cell("{:+p1} [{:+p1}, {:+p1}] ({})", *(_mem(detector, f"minus_loss_top10{x}", solver)
                                                       for x in ("", "_ci_low", "_ci_high")),
                      _mem(detector, lambda r: _p_text(float(r["minus_loss_top10_p"].iloc[0])), solver))]


def _p_text(p: float) -> str:
    return "p < 1e-4" if p < 1e-4 else f"p = {fmt(p, 'g2')}"


_SI3 = "mislabel/self_influence@0.001"
_LAMBDA = _MEM(_first_damping)
SECTION.table("detectors_memorised", ["ranking (memorised regime, seed 3)", "top 10% [95% CI]",
                                      "this − loss at 10%, paired [95% CI] (McNemar)"], [
    [cell("**EK-FAC self-influence, all layers, λ = {}**", _LAMBDA), *mem_cells("self_influence")],
    [cell("loss + EK-FAC at λ = {} (rank average)", _LAMBDA), *mem_cells("loss_and_self_influence")],
    ["EK-FAC self-influence, all layers, λ = 1e-3",
     cell("{:%1} [{:p1}, {:p1}]", *(_MEM(f"{_SI3}/recall@10{x}") for x in ("", "_ci_low", "_ci_high"))),
     cell("{:+p1} [{:+p1}, {:+p1}] ({})", *(_MEM(f"{_SI3}/minus_loss_top10{x}") for x in ("", "_ci_low", "_ci_high")),
          _MEM(lambda r: _p_text(float(r[f"{_SI3}/minus_loss_top10_p"].iloc[0]))))],
    ["**loss + held-out harm (rank average): the choice**", *mem_cells("loss_and_heldout_harm", "trak")],
    [cell("held-out harm (TRAK, {:,0} test queries)", _MEM_TRAK("query.n")), *mem_cells("heldout_harm", "trak")],
    ["TRAK self-influence", *mem_cells("self_influence", "trak")],
    ["loss + TRAK (rank average)", *mem_cells("loss_and_self_influence", "trak")],
    ["gradient norm (identity)", *mem_cells("identity")],
    ["loss", *mem_cells("loss")],
    ["random", *mem_cells("random")],
], "1h: the memorised regime's fresh draw (seed 3)")

# ---------------------------------------------------------------------------------------------------------------
# prose numbers

_FM1, _M51 = Sweep("detectors_fmnist_fresh"), Sweep("detectors_mnist5k_fresh")
SECTION.number("det_fmnist_n", cell("{:,0}", _FM1("train/n_train", job(seed=1))))
SECTION.number("det_fmnist_flipped", cell("{:,0}", _FM1("train/n_flipped", job(seed=1))))
SECTION.number("det_mnist5k_n", cell("{:,0}", _M51("train/n_train", job(seed=1))))
SECTION.number("det_mnist5k_flipped", cell("{:,0}", _M51("train/n_flipped", job(seed=1))))
SECTION.number("det_memorised_train_accuracy", cell("{:.3}", _MEM("train/train_accuracy")))
SECTION.number("det_explore_rows", cell("{:d}", ref(EXPLORE, len)))
SECTION.number("det_checkpoints", cell("{:d}", _CH("trainer.checkpoints", job(solver="tracin"))))


def _diff(draw: str, kind: str, detector: str) -> Cell:
    return cell("{:+p1} [{:+p1}, {:+p1}]", *(row_of(draw, kind, detector, k) for k in (
        "minus_loss_top10", "minus_loss_top10_ci_low", "minus_loss_top10_ci_high")))


def _span(refs: Sequence[Ref], f: str = "p1", signed: int = 1) -> Callable[[], str]:
    """"lo–hi" of the values of ``refs`` (times ``signed``)."""
    def text() -> str:
        v = [signed * float(r.value()) for r in refs]
        return f"{fmt(min(v), f)}–{fmt(max(v), f)}"
    return text


def _resolved_below_zero(kind: str, detector: str) -> Callable[[], str]:
    """The fresh draws where ``detector``'s paired interval lies below zero (its upper end < 0)."""
    def text() -> str:
        hit = [DRAWS[d][0].removesuffix(" (fresh)") for d in FRESH
               if float(row_of(d, kind, detector, "minus_loss_top10_ci_high").value()) < 0]
        return " and ".join(hit) if hit else "none of them"
    return text


SECTION.number("det_choice_seed0", _diff("fmnist0", "heldout", "loss_and_heldout_harm"))
SECTION.number("det_choice_fresh_deficit", _span([row_of(d, "heldout", "loss_and_heldout_harm", "minus_loss_top10")
                                                  for d in FRESH], signed=-1))
SECTION.number("det_choice_resolved", _resolved_below_zero("heldout", "loss_and_heldout_harm"))
# self-influence (TRAK, EK-FAC) and its rank average with the loss, on the four fresh draws
_SI_FRESH = [(d, k) for d in FRESH for k in ("trak", "ekfac")]
SECTION.number("det_si_fresh_deficit", _span([row_of(d, k, "self_influence", "minus_loss_top10")
                                              for d, k in _SI_FRESH], signed=-1))
SECTION.number("det_rankavg_fresh_deficit", _span([row_of(d, k, "loss_and_self_influence", "minus_loss_top10")
                                                   for d, k in _SI_FRESH], signed=-1))


_FAMILY = {"tracin": "TracIn", "trak": "TRAK", "ekfac": "EK-FAC"}


def _closest_rank_average() -> str:
    """The rank average of self-influence with the loss closest to the loss over every standard-regime draw of the
    summary (choosing and fresh, every solver): "-0.6 [-2.4, +1.4] (TRAK, FashionMNIST seed 0)"."""
    df = load(SUMMARY)
    df = df[df["data"].str.endswith("standard") & (df["detector"] == "loss_and_self_influence")]
    best = df.loc[df["minus_loss_top10"].idxmax()]
    draw = f"{best['data'].split(' ')[0]} seed {best['seed']}"
    return (f"{fmt(best['minus_loss_top10'], '+p1')} [{fmt(best['minus_loss_top10_ci_low'], '+p1')}, "
            f"{fmt(best['minus_loss_top10_ci_high'], '+p1')}] ({_FAMILY[best['solver']]}, {draw})")


SECTION.number("det_closest_rank_average", _closest_rank_average)
SECTION.number("det_mem_lambda", cell("{}", _LAMBDA))
for _name, _det in (("si", "self_influence"), ("rankavg", "loss_and_self_influence"), ("gradnorm", "identity")):
    SECTION.number(f"det_mem_{_name}", cell("{:+p1} [{:+p1}, {:+p1}]", *(_mem(_det, f"minus_loss_top10{x}")
                                                                         for x in ("", "_ci_low", "_ci_high"))))
SECTION.number("det_mem_loss_top10", cell("{:%1}", _mem("loss", "recall@10")))
# the choice (loss + held-out harm, TRAK) on the memorised draw, against the loss and behind EK-FAC at λ = 1e-8
SECTION.number("det_mem_choice", cell("{:+p1} [{:+p1}, {:+p1}]", *(_mem("loss_and_heldout_harm", f"minus_loss_top10{x}",
                                                                        "trak") for x in ("", "_ci_low", "_ci_high"))))
SECTION.number("det_mem_choice_top10", cell("{:%1}", _mem("loss_and_heldout_harm", "recall@10", "trak")))
SECTION.number("det_mem_choice_behind_si", lambda: fmt(float(_mem("self_influence", "recall@10").value())
                                                       - float(_mem("loss_and_heldout_harm", "recall@10", "trak").value()),
                                                       "p1"))
SECTION.number("det_mem_trak_si", cell("{:+p1} [{:+p1}, {:+p1}]", *(_mem("self_influence", f"minus_loss_top10{x}",
                                                                         "trak") for x in ("", "_ci_low", "_ci_high"))))

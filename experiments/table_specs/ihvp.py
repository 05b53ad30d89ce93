"""Section 3 of RESULTS.md: IHVP error against the CG reference across damping (runs ihvp_cnn, ihvp_resnet18,
ihvp_depth): one job per solver and damping; the reference's own relative residual says whether the error is
against a valid reference. The helpers here also serve section 3b (precond.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
from tables_engine import Cell, Ref, Section, Sweep, cell, fmt

SECTION = Section("3. IHVP accuracy against CG across damping")


def ihvp_ref(name: str, solver: str, lam: str, key: str | Callable[[pd.DataFrame], Any]) -> Ref:
    """``key`` of the job of sweep ``name`` with overrides ``solver`` and ``solver.damping=lam``."""
    return Sweep(name)(key, solver=solver, **{"solver.damping": lam})


def against_valid(key: str) -> Callable[[pd.DataFrame], Any]:
    """``key`` of the selected job, or NaN (printed –) where its reference did not converge to 0.1 (no reference)."""
    def get(df: pd.DataFrame) -> Any:
        (row,) = df.to_dict("records")
        return row[key] if row["ihvp/ref_rel_residual"] <= 0.1 else math.nan
    return get


def ref_state(df: pd.DataFrame) -> str:
    (row,) = df.to_dict("records")
    r = row["ihvp/ref_rel_residual"]
    return f"converged ({fmt(r, 'e2')})" if str(row["ihvp/ref_converged"]) == "True" else \
        f"approximate ({fmt(r, 'e2')})" if r <= 0.1 else f"**none** ({fmt(r, 'e2')})"


def ihvp_rows(name: str, dampings: Sequence[str], solvers: Sequence[str], time_at: str | None = None
              ) -> list[list[str | Cell]]:
    rows: list[list[str | Cell]] = []
    time_at = time_at or dampings[0]
    for lam in dampings:
        rows.append([f"{float(lam):g}", cell("{}", ihvp_ref(name, solvers[0], lam, ref_state)),
                     *(cell("{:.3} / {:.3}", ihvp_ref(name, s, lam, against_valid("ihvp/rel_error")),
                            ihvp_ref(name, s, lam, against_valid("ihvp/cosine"))) for s in solvers)])
    rows.append([f"time (s): fit + solve, at λ = {float(time_at):g}", "",
                 *(cell("{:s3}", ihvp_ref(name, s, time_at, "ihvp/time_s")) for s in solvers)])
    return rows


def iters_cell(name: str, solver: str, lam: str) -> Cell:
    """An iterative solver's iterations to an error of 0.1 / 0.01, its time to 0.1 and its final residual."""
    def R(key: str, valid: bool = True) -> Ref:
        return ihvp_ref(name, solver, lam, against_valid(key) if valid else key)

    return cell("{:d} / {:d} ({:s3} s); {:e2}", R("ihvp/iters_to_0.1"), R("ihvp/iters_to_0.01"),
                R("ihvp/time_s_to_0.1"), R("ihvp/rel_residual", valid=False))


IHVP_HEAD = ["λ", "CG reference (relative residual)", "EK-FAC error / cosine", "K-FAC error / cosine",
             "LiSSA (depth 200) error / cosine"]
SECTION.table("ihvp_cnn", IHVP_HEAD,
              ihvp_rows("ihvp_cnn", ["0.001", "0.01", "0.1", "1.0", "10.0"], ["ekfac", "kfac", "lissa"]),
              "3: IHVP error vs the CG reference across damping, CNN")
SECTION.table("ihvp_resnet18", IHVP_HEAD, ihvp_rows("ihvp_resnet18", ["10.0", "1.0", "0.1", "0.01", "0.001"],
                                                    ["ekfac", "kfac", "lissa"]),
              "3: IHVP error vs the CG reference across damping, reduced ResNet-18")

# LiSSA depth at λ = 1e-2 (run ihvp_depth: one job per solver.depth)
_ID = Sweep("ihvp_depth")
_DEPTHS = (25, 50, 100, 400)
SECTION.table("ihvp_depth", ["LiSSA depth", *map(str, _DEPTHS)],
              [["error vs CG", *(cell("{:.3}", _ID("ihvp/rel_error", **{"solver.depth": d})) for d in _DEPTHS)],
               ["cosine", *(cell("{:.2}", _ID("ihvp/cosine", **{"solver.depth": d})) for d in _DEPTHS)],
               ["time (s)", *(cell("{:s3}", _ID("ihvp/time_s", **{"solver.depth": d})) for d in _DEPTHS)]],
              "3: LiSSA error, cosine and time against depth at λ = 1e-2")

# ---------------------------------------------------------------------------------------------------------------
# prose numbers (RESULTS.md's text quotes them as <!-- num:NAME -->...<!-- /num -->)


def _error_range(name: str, solver: str, dampings: Sequence[str]) -> Callable[[], str]:
    """"lo–hi" of ``solver``'s relative error over ``dampings`` (two decimals)."""
    def text() -> str:
        errs = [ihvp_ref(name, solver, d, "ihvp/rel_error").value() for d in dampings]
        return f"{fmt(min(errs), '.2')}–{fmt(max(errs), '.2')}"
    return text


SECTION.number("cnn_ekfac_error_range", _error_range("ihvp_cnn", "ekfac", ["0.001", "0.01", "0.1", "1.0", "10.0"]))
for _s in ("ekfac", "lissa"):
    for _lam, _tag in (("10.0", "10"), ("1.0", "1")):
        SECTION.number(f"r18_{_s}_error_{_tag}", cell("{:.2}", ihvp_ref("ihvp_resnet18", _s, _lam, "ihvp/rel_error")))

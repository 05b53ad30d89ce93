"""experiments/sec62_time_matched.py: what each solver has reached when another one finishes, from the ihvp stage's
per-damping rows and error traces (written here as the stage writes them)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "sec62_time_matched.py"


@pytest.fixture()
def tm(tmp_path, monkeypatch):
    mod = load_script(SCRIPT, "sec62_time_matched")
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    cols = ["solver", "damping", "rel_error", "time_s", "ref_converged"]
    (tmp_path / "direct").mkdir()
    pd.DataFrame([["ekfac", 0.01, 0.9, 10.0, True], ["ekfac", 1.0, 0.5, 10.0, True]], columns=cols).to_csv(
        tmp_path / "direct" / "job0_ihvp.csv", index=False)
    (tmp_path / "iter").mkdir()
    pd.DataFrame([["lissa", 0.01, 0.95, 40.0, True], ["lissa", 1.0, 0.1, 40.0, True]], columns=cols).to_csv(
        tmp_path / "iter" / "job0_ihvp.csv", index=False)
    trace = [["lissa", lam, i + 1, 5.0 * (i + 1), e] for lam, errs in
             ((0.01, [1.0, 0.99, 0.97, 0.96, 0.955, 0.952, 0.951, 0.95]), (1.0, [0.9, 0.6, 0.45, 0.3, 0.2, 0.15, 0.12, 0.1]))
             for i, e in enumerate(errs)]
    pd.DataFrame(trace, columns=["solver", "damping", "iteration", "time_s", "rel_error"]).to_csv(
        tmp_path / "iter" / "job0_ihvp_trace.csv", index=False)
    return mod


def test_errors_at_each_others_finishing_time(tm, tmp_path):
    out = tmp_path / "tm.csv"
    tm.main([str(out), "EK-FAC=direct/0", "LiSSA=iter/0"])
    df = pd.read_csv(out).set_index(["damping", "budget_of", "series"])
    # at EK-FAC's 10 s LiSSA has its 2nd step's iterate; at LiSSA's 40 s EK-FAC is long done
    assert df.loc[(1.0, "EK-FAC", "LiSSA"), "rel_error_at_budget"] == 0.6
    assert df.loc[(1.0, "LiSSA", "EK-FAC"), "rel_error_at_budget"] == 0.5
    assert df.loc[(0.01, "EK-FAC", "LiSSA"), "rel_error_at_budget"] == 0.99
    # LiSSA first reached EK-FAC's 0.5 at 15 s (0.45) at λ = 1, and never its 0.9 at λ = 0.01 (0.95 at best)
    assert df.loc[(1.0, "EK-FAC", "LiSSA"), "time_to_budget_error_s"] == 15.0
    assert pd.isna(df.loc[(0.01, "EK-FAC", "LiSSA"), "time_to_budget_error_s"])
    # a direct solver before its own finishing time has nothing
    assert pd.isna(tm.error_at(pd.read_csv(tmp_path / "direct" / "job0_ihvp.csv"), None, 1.0, 5.0))


def test_a_series_joins_dampings_run_as_sweeps_of_their_own(tm, tmp_path):
    """``LABEL=A/0+B/0``: one series from jobs that each ran some of the dampings (rows and traces joined)."""
    for lam in (0.01, 1.0):
        d = tmp_path / f"iter_{lam}"
        d.mkdir()
        for name in ("ihvp", "ihvp_trace"):
            df = pd.read_csv(tmp_path / "iter" / f"job0_{name}.csv")
            df[df["damping"] == lam].to_csv(d / f"job0_{name}.csv", index=False)
    whole = tm.table(["EK-FAC=direct/0", "LiSSA=iter/0"])
    joined = tm.table(["EK-FAC=direct/0", "LiSSA=iter_0.01/0+iter_1.0/0"])
    pd.testing.assert_frame_equal(whole, joined)
    # a joined job without a trace (a LiSSA run from before repeats were traced) is direct at its own dampings only
    (tmp_path / "iter_1.0" / "job0_ihvp_trace.csv").unlink()
    part = tm.table(["EK-FAC=direct/0", "LiSSA=iter_0.01/0+iter_1.0/0"]).set_index(["damping", "budget_of", "series"])
    full = whole.set_index(["damping", "budget_of", "series"])
    assert bool(part.loc[(0.01, "EK-FAC", "LiSSA"), "iterative"]) and not bool(part.loc[(1.0, "EK-FAC", "LiSSA"),
                                                                                        "iterative"])
    assert part.loc[(0.01, "EK-FAC", "LiSSA"), "rel_error_at_budget"] == full.loc[(0.01, "EK-FAC", "LiSSA"),
                                                                                  "rel_error_at_budget"]

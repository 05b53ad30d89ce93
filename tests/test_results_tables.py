"""experiments/RESULTS.md's generated tables agree with the committed result files they are built from.

Every ``<!-- table:NAME -->`` ... ``<!-- /table -->`` block of RESULTS.md must be exactly what
``experiments/tables.py`` computes from the committed CSV/JSON files (no training, no data: only those files are
read). To fix a failure, run ``python experiments/tables.py`` (after changing the files or the spec) and commit
RESULTS.md with it.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_tables():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "experiments" / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


tables = _load_tables()
TEXT = tables.RESULTS_MD.read_text()
IN_FILE = tables.current(TEXT)


def test_every_marker_has_a_spec_and_every_spec_a_marker() -> None:
    assert tables.markers(TEXT), "RESULTS.md has no generated tables"
    assert tables.problems(TEXT) == []


@pytest.mark.parametrize("name", sorted(tables.TABLES))
def test_table_matches_committed_files(name: str) -> None:
    assert name in IN_FILE, f"no <!-- table:{name} --> marker in RESULTS.md"
    want = tables.TABLES[name].markdown()
    got = IN_FILE[name]
    diff = "".join(difflib.unified_diff(got.splitlines(True), want.splitlines(True), "RESULTS.md",
                                        "from the committed files"))
    assert got == want, (f"table {name} in RESULTS.md differs from {tables.TABLES[name].sources()}; run "
                         f"`python experiments/tables.py`:\n{diff}")


@pytest.mark.parametrize("name", sorted(tables.TABLES))
def test_table_reads_only_committed_result_files(name: str) -> None:
    srcs = tables.TABLES[name].sources()
    assert srcs, f"table {name} reads no file"
    for src in srcs:
        assert src.startswith(("experiments/results/", "benchmarks/results/")), src
        assert (ROOT / src).is_file(), f"table {name} reads {src}, which does not exist"


def test_check_mode_detects_a_changed_number(tmp_path: Path) -> None:
    name = sorted(IN_FILE)[0]
    body = IN_FILE[name]
    last = body.rstrip("\n").rsplit("\n", 1)[1]
    altered = TEXT.replace(body, body.replace(last, last.replace("|", "| 9.999 |", 1)), 1)
    f = tmp_path / "RESULTS.md"
    f.write_text(altered)
    assert tables.main(["--check", "--file", str(f)]) == 1
    assert tables.main(["--file", str(f)]) == 0  # rewrite restores it
    assert f.read_text() == tables.render(TEXT)


def test_marker_without_spec_is_reported() -> None:
    text = TEXT + "\n<!-- table:no_such_table -->\n| a |\n|---|\n<!-- /table -->\n"
    assert any("no_such_table" in p for p in tables.problems(text))


def test_lds_pair_across_sweeps_equals_the_reports_own_pairing() -> None:
    """experiments/lds_pair.py (two sweeps' jobs on one ground truth) gives, for two jobs of one sweep, exactly the
    rows influencelab-report wrote to that sweep's lds_paired.csv (EK-FAC minus K-FAC in run lds)."""
    import pandas as pd

    spec = importlib.util.spec_from_file_location("lds_pair", ROOT / "experiments" / "lds_pair.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = ROOT / "experiments" / "results" / "lds"
    read = {"damping": str}
    got = mod.pair(pd.read_csv(res / "job0_lds.csv", dtype=read), pd.read_csv(res / "job1_lds.csv", dtype=read))
    report = pd.read_csv(res / "lds_paired.csv", dtype={"damping_a": str, "damping_b": str})
    report = report[(report.job_a == 0) & (report.job_b == 1) & (report.damping_a == report.damping_b)]
    assert len(got) == len(report) == 4  # loss and margin, at 1e-3 and auto
    merged = got.merge(report, left_on=["measurement", "damping"], right_on=["measurement", "damping_a"])
    for col in ("n", "diff", "ci_low", "ci_high"):
        assert merged[f"{col}_x"].tolist() == pytest.approx(merged[f"{col}_y"].tolist(), rel=1e-12)


def test_ihvp_figure_combines_sweeps_keeping_the_first_of_a_repeated_solver(tmp_path: Path) -> None:
    """experiments/ihvp_figure.py on the reduced ResNet-18's three committed sweeps: EK-FAC, repeated as a check in
    run ihvp_resnet18_lissa_ekfac, is taken once (from ihvp_resnet18), every other job is a point, and the sweeps'
    other keys (CG's max_iter) do not split a solver into two series."""
    spec = importlib.util.spec_from_file_location("ihvp_figure", ROOT / "experiments" / "ihvp_figure.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sweeps = [ROOT / "experiments" / "results" / n
              for n in ("ihvp_resnet18", "ihvp_resnet18_pcg", "ihvp_resnet18_lissa_ekfac")]
    rows = mod.combined_rows(sweeps)
    got = sorted((r["solver"], float(r["solver.damping"])) for r in rows)
    assert len(got) == len(set(got)) == 15 + 4 + 2
    assert ("lissa_ekfac", 10.0) in got and ("cg_ekfac", 1.0) in got
    from influencelab.stages.ihvp import error_points
    _, pts = error_points(rows)
    assert sorted({p[0] for p in pts}) == ["cg", "cg+ekfac", "ekfac", "kfac", "lissa", "lissa+ekfac"]
    assert len(pts) == 21

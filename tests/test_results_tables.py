"""experiments/RESULTS.md's generated tables agree with the committed result files they are built from.

Every ``<!-- table:NAME -->`` ... ``<!-- /table -->`` block of RESULTS.md must be exactly what
``experiments/tables.py`` computes from the committed CSV/JSON files (no training, no data: only those files are
read). To fix a failure, run ``python experiments/tables.py`` (after changing the files or the spec) and commit
RESULTS.md with it. A table names a sweep's jobs by their overrides, so reordering a sweep's jobs changes nothing,
and a selection that no longer names exactly one job fails loudly.
"""

from __future__ import annotations

import difflib
import importlib.util
import random
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
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


def test_check_mode_detects_a_changed_prose_number(tmp_path: Path) -> None:
    """A number quoted in RESULTS.md's text (``<!-- num:NAME -->``) is checked against its file like a table: an
    altered quote fails --check, a rewrite restores the file's value; markers and specs must match both ways."""
    names = tables.numbers_in(TEXT)
    assert names, "RESULTS.md quotes no generated prose number"
    name = names[0]
    marked = f"<!-- num:{name} -->{tables.number_text(name)}<!-- /num -->"
    assert marked in TEXT
    f = tmp_path / "RESULTS.md"
    f.write_text(TEXT.replace(marked, f"<!-- num:{name} -->999<!-- /num -->", 1))
    assert tables.main(["--check", "--file", str(f)]) == 1
    assert tables.main(["--file", str(f)]) == 0
    assert f.read_text() == tables.render(TEXT) == TEXT
    assert any("no_such_number" in p for p in tables.problems(TEXT + "<!-- num:no_such_number -->1<!-- /num -->"))
    assert any(name in p for p in tables.problems(TEXT.replace(marked, "quoted without a marker")))


@pytest.mark.parametrize("name", sorted(tables.NUMBERS))
def test_every_prose_number_reads_committed_files(name: str) -> None:
    """Each prose number renders from the committed files (a missing column or job fails here, naming it)."""
    assert tables.number_text(name).strip()


def test_marker_without_spec_is_reported() -> None:
    text = TEXT + "\n<!-- table:no_such_table -->\n| a |\n|---|\n<!-- /table -->\n"
    assert any("no_such_table" in p for p in tables.problems(text))


def _reports_read() -> set[str]:
    """Every sweep report.csv some table reads."""
    return {s for t in tables.TABLES.values() for s in t.sources() if s.endswith("/report.csv")}


def _negated(x: str) -> str:
    return x[1:] if x.startswith("-") else f"-{x}"


def _reorder_sweep(d: Path, rng: random.Random) -> dict[int, int]:
    """Rewrite the sweep in ``d`` as if its jobs had run in another order, as influencelab-report would have
    written it: report.csv's rows permuted and numbered 0, 1, ... again, each job's own files (job<N>_*) renamed
    to its new number, and lds_paired.csv's job numbers changed (each pair again in job order: a pair whose two
    jobs swapped order is the same row negated). Every cell keeps its text. Returns old -> new job number."""
    report = pd.read_csv(d / "report.csv", dtype=str, keep_default_na=False)
    order = list(range(len(report)))
    while order == sorted(order):
        rng.shuffle(order)
    report = report.iloc[order].reset_index(drop=True)
    new = {int(old): i for i, old in enumerate(report["job"])}
    report["job"] = [str(i) for i in range(len(report))]
    report.to_csv(d / "report.csv", index=False)
    own = [(f, re.fullmatch(r"job(\d+)_(.+)", f.name)) for f in d.iterdir()]
    moved = [(f.rename(f.with_name(f"moving_{f.name}")), m) for f, m in own if m]
    for f, m in moved:
        f.rename(d / f"job{new[int(m[1])]}_{m[2]}")
    if (d / "lds_paired.csv").exists():
        p = pd.read_csv(d / "lds_paired.csv", dtype=str, keep_default_na=False)
        p["job_a"] = [str(new[int(j)]) for j in p["job_a"]]
        p["job_b"] = [str(new[int(j)]) for j in p["job_b"]]
        swap = p["job_a"].astype(int) > p["job_b"].astype(int)
        for a, b in (("job_a", "job_b"), ("damping_a", "damping_b"), ("a", "b"), ("mean_a", "mean_b")):
            p.loc[swap, [a, b]] = p.loc[swap, [b, a]].to_numpy()
        p.loc[swap, "diff"] = p.loc[swap, "diff"].map(_negated)
        low, high = p.loc[swap, "ci_low"].map(_negated), p.loc[swap, "ci_high"].map(_negated)
        p.loc[swap, "ci_low"], p.loc[swap, "ci_high"] = high.to_numpy(), low.to_numpy()
        p.to_csv(d / "lds_paired.csv", index=False)
    return new


def test_tables_do_not_change_when_every_sweep_is_reordered(tmp_path: Path) -> None:
    """Every table reads a sweep's jobs by their overrides, not by their position or number: with the jobs of
    every multi-job sweep that a table reads reordered (a copy of the result folders), every table is identical."""
    want = {n: t.markdown() for n, t in tables.TABLES.items()}
    skip = shutil.ignore_patterns("*.png", "*.md", "report_figures")
    for folder in ("experiments/results", "benchmarks/results"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=skip)
    rng, reordered = random.Random(0), {}
    for rel in sorted(_reports_read()):
        if len(pd.read_csv(ROOT / rel)) > 1:
            reordered[rel] = _reorder_sweep((tmp_path / rel).parent, rng)
    assert len(reordered) >= 20, sorted(reordered)
    assert all(any(o != n for o, n in m.items()) for m in reordered.values())
    with tables.reading_from(tmp_path):
        got = {n: t.markdown() for n, t in tables.TABLES.items()}
        assert tables.Sweep("lds").number(tables.job(solver="ekfac")) == reordered[
            "experiments/results/lds/report.csv"][0]
    changed = [n for n in want if got[n] != want[n]]
    assert not changed, f"tables that changed when the sweeps' jobs were reordered: {changed}"


def test_every_value_of_a_sweep_names_its_job_by_overrides() -> None:
    """No table reads a report.csv row by its job number or position: each value from a report.csv is of one job
    named by its overrides, or an aggregate (a callable) over the jobs some overrides name (e.g. a row's seeds), or
    over all jobs."""
    for t in tables.TABLES.values():
        for r in t.refs():
            if isinstance(r.src, str) and r.src.endswith("/report.csv"):
                assert r.one or callable(r.key), (t.name, r.src, r.where)
                assert not {k for k, _ in r.where} & {"job", "row"}, (t.name, r.src, r.where)


@pytest.mark.parametrize(("which", "found"), [({"solver": "sgd"}, 0), ({}, 4)])
def test_a_selection_of_no_job_or_several_fails_naming_table_file_and_overrides(which: dict, found: int) -> None:
    probe = tables.Table("probe", ["LDS"], [[tables.cell("{:.3}", tables.Sweep("lds")("lds/mean", **which))]])
    overrides = ", ".join(f"{k}={v}" for k, v in which.items()) or "no selection"
    with pytest.raises(LookupError, match=re.escape(
            f"table probe: experiments/results/lds/report.csv: {overrides} selects {found} rows, not 1")):
        probe.markdown()
    per_job = tables.Table("probe", ["sign"], [[tables.cell("{}", tables.Sweep("loo_warm").job_ref(
        tables.job("solver.damping=5"), "loo.csv", "actual"))]])
    with pytest.raises(LookupError, match=re.escape(
            "table probe: experiments/results/loo_warm/report.csv: solver.damping=5 selects 0 jobs, not 1")):
        per_job.markdown()
    with pytest.raises(ValueError, match="by its overrides"):
        tables.job("job=0")


def test_a_job_is_matched_by_the_text_or_the_number_of_its_overrides() -> None:
    """``solver.damping=1e-3`` is the job whose report.csv says 0.001; hydra's escapes are undone (run
    mislabel_modules_seed1 wrote ``last\\:1``); ``null`` is the override null, not a missing value."""
    S = tables.Sweep("unlearn_precond")
    pick = tables.job("unlearn.size=10", "solver.preconditioner=null", "solver.damping=1e-2")
    assert S.number(pick) == 0
    assert tables.Sweep("mislabel_modules_seed1").number(tables.job("solver.modules=last:1")) == 0
    assert tables.Sweep("lds_damping").number(tables.job("solver.damping=auto")) == 4


def test_a_section_registers_prose_numbers_beside_its_tables() -> None:
    """The prose numbers' hook: a spec module registers a named value (a cell) beside its tables; its text is what
    a ``<!-- num:NAME -->`` marker would hold."""
    section = tables.Section("probe")
    try:
        section.number("probe_lds_ekfac", tables.cell("{:.3}", tables.Sweep("lds")("lds/mean", solver="ekfac")))
        assert tables.number_text("probe_lds_ekfac") == "0.269"
        with pytest.raises(ValueError, match="two numbers"):
            section.number("probe_lds_ekfac", lambda: "x")
    finally:
        tables.NUMBERS.pop("probe_lds_ekfac", None)


def test_lds_pair_across_sweeps_equals_the_reports_own_pairing() -> None:
    """experiments/lds_pair.py (two sweeps' jobs on one ground truth) gives, for two jobs of one sweep, exactly the
    rows influencelab-report wrote to that sweep's lds_paired.csv (EK-FAC minus K-FAC in run lds)."""
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


def test_a_spec_without_its_marker_writes_nothing_and_says_so(tmp_path: Path, capsys) -> None:
    """A number spec whose marker is missing (e.g. a run's numbers, once its files exist, before the prose quotes
    them) stops the rewrite: exit 1, the file unchanged, and a line saying that nothing was written."""
    name = next(n for n in tables.numbers_in(TEXT) if TEXT.count(f"<!-- num:{n} -->") == 1)  # quoted once
    marked = f"<!-- num:{name} -->{tables.number_text(name)}<!-- /num -->"
    stale = TEXT.replace(marked, "quoted without a marker")
    f = tmp_path / "RESULTS.md"
    f.write_text(stale)
    assert tables.main(["--file", str(f)]) == 1
    assert f.read_text() == stale
    err = capsys.readouterr().err
    assert f"number spec without a marker in RESULTS.md: {name}" in err and "was not written" in err


def test_a_series_that_ran_on_another_trained_model_is_marked(tmp_path: Path) -> None:
    """Section 3.0's tables compare solvers on one trained model: a series whose sweep logged other training
    metrics (the same config trained on another machine's CPU) gets "†" beside its cell; one on the same model none."""
    spec = sys.modules["table_specs.ihvp_exact"]
    series, lam = "LiSSA+EK-FAC (tuned)", "0.0001"
    assert not spec.other_model("resnet18", series, lam)
    (plain,) = spec.rows("resnet18", [series], [lam])
    assert spec.OTHER_MODEL not in plain[2].render()
    shutil.copytree(ROOT / "experiments" / "results", tmp_path / "experiments" / "results",
                    ignore=shutil.ignore_patterns("*.png"))
    report = tmp_path / "experiments/results/ihvp_resnet18_exact_lissa_ekfac_1e-4/report.csv"
    df = pd.read_csv(report)
    df["train/test_accuracy"], df["train/train_loss"] = 0.696, 0.0546
    df.to_csv(report, index=False)
    with tables.reading_from(tmp_path):
        assert spec.other_model("resnet18", series, lam)
        assert not spec.other_model("resnet18", "EK-FAC", lam)
        assert not spec.other_model("resnet18", series, "0.01")  # the same series' other sweep: the cached model
        (marked,) = spec.rows("resnet18", [series], [lam])
        assert marked[2].render() == plain[2].render() + f" {spec.OTHER_MODEL}"

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

"""The README's measured numbers for its third command (LiSSA at its defaults, plain CG, and the Gram solver that
converges there) are the committed files' numbers, rounded as printed: a rerun that changes a file without the
README, or a hand-edited README figure, fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results" / "readme_lissa"


def _paragraph() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("LiSSA on the third command")
    return " ".join(text[start:text.index("\n\n", start)].split())


def test_lissa_defaults_residuals_are_the_files():
    m = json.loads((RESULTS / "defaults_metrics.json").read_text())
    r = {d: f"{m[f'solver/rel_residual_max@{d}']:.2f}" for d in ("0.0001", "0.001", "0.01", "1", "10")}
    assert r["0.0001"] == r["0.001"]
    p = _paragraph()
    assert (f"{r['0.0001']} at λ = 1e-4 and 1e-3, {r['0.01']} at 1e-2, {r['1']} at λ = 1 and {r['10']} at λ = 10"
            in p), p
    assert not any(m[k] for k in m if k.startswith("solver/converged@"))  # "unconverged at its defaults"


def test_cg_defaults_residual_is_the_log():
    log = (RESULTS / "cg_defaults_warning.log").read_text()
    worst = float(re.search(r"worst relative residual ([0-9.e+-]+)", log).group(1))
    assert re.search(r"in (\d+) iterations", log).group(1) == "300"
    assert f"(residual {worst:.2f}:" in _paragraph()


def test_gram_converges_on_the_third_command_as_printed():
    m = json.loads((RESULTS / "gram_metrics.json").read_text())
    p = _paragraph()
    res = [f"{m[f'solver/rel_residual_max@{d}']:.1e}"
           for d in ("0.0001", "0.001", "0.01")]
    assert f"{res[0]}, {res[1]} and {res[2]} at λ = 1e-4, 1e-3, 1e-2" in p, (res, p)
    assert all(m[f"solver/converged@{d}"] for d in ("0.0001", "0.001", "0.01"))
    assert max(m[f"solver/rel_residual_max@{d}"] for d in ("0.0001", "0.001", "0.01")) <= 1e-6
    assert f"a {round(m['time/fit_s'] / 60)}-minute fit" in p
    assert f"an {m['mem/peak_rss_mb'] / 1024:.1f} GB peak" in p
    assert f"then {round(m['time/pairwise_s'])} s for the pairwise scores" in p

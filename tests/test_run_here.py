"""experiments/run_here.sh, the one source of the commands behind RESULTS.md: a sweep name asked for must exist."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY": "1", "IL": "false", "REPORT": "false"}
    return subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_a_misspelt_sweep_name_fails_with_its_name():
    r = _bash("experiments/run_here.sh", "ihvp_cnn_exact", "ihvp_cnn_exactt")
    assert r.returncode == 2
    assert "no sweep named ihvp_cnn_exactt" in r.stderr
    assert "ihvp_cnn_exact " not in r.stderr.replace("ihvp_cnn_exactt", "")


def test_every_sweep_of_section_3_is_defined():
    """sec62_exact.sh names every section 3.0 sweep (some built in loops over dampings); DRY=1 runs none of them."""
    r = _bash("experiments/sec62_exact.sh")
    assert r.returncode == 0, r.stderr

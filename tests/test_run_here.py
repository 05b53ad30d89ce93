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


def test_dry_run_lists_the_sweeps_in_the_files_order_not_the_order_named():
    """Two λ = 0.1 sweeps named short-first run long-first (the file's order): DRY=1 says so before hours are spent."""
    r = _bash("experiments/run_here.sh", "ihvp_resnet18_exact_cg_ekfac_0.1", "ihvp_resnet18_exact_lissa_ekfac_0.1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["would run: ihvp_resnet18_exact_lissa_ekfac_0.1",
                                         "would run: ihvp_resnet18_exact_cg_ekfac_0.1"]


def test_dry_run_of_everything_runs_no_script_step_and_names_them():
    """With no names, DRY=1 lists every sweep and the script steps between them (which read multirun/ outputs) without
    running any; a step's own name is accepted like a sweep's."""
    r = _bash("experiments/run_here.sh")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "would run: detectors_summary (script step)" in lines and "would run: mislabel_standard" == lines[0]
    assert lines.index("would run: mnist5k_mislabel") < lines.index("would run: mnist5k_mislabel (script step)")
    assert _bash("experiments/run_here.sh", "detectors_fmnist_choose_explore").returncode == 0

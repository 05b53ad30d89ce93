"""The log says what it reuses, in the solver's own terms: cached factors (EK-FAC), LiSSA's cached fit (its scale,
no factors), CG's setup (nothing fitted); a damping-shared pass read from the cache says so; no torch.jit.script
FutureWarning from torch's forward-mode AD in CG/LiSSA runs."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from influencelab import Attributor


def _tiny(n: int = 32):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval(), TensorDataset(x, y)


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("influencelab")]


@pytest.mark.parametrize(("solver", "what"), [("ekfac", "factors"), ("lissa", "fit (scale)"),
                                              ("cg", "setup (nothing fitted)")])
def test_reused_fit_is_named_by_what_the_solver_fits(solver, what, tmp_path, caplog):
    net, train = _tiny()
    caplog.set_level(logging.INFO, logger="influencelab")
    Attributor(net, solver=solver, damping=1e-2, cache_dir=tmp_path).fit(train)
    assert not [s for s in _lines(caplog) if s.startswith("reusing cached")]
    Attributor(net, solver=solver, damping=1e-2, cache_dir=tmp_path).fit(train)
    (line,) = [s for s in _lines(caplog) if s.startswith("reusing cached")]
    assert line.startswith(f"reusing cached {solver} {what} "), line
    if solver != "ekfac":
        assert "factors" not in line


def test_damping_shared_pass_says_it_is_shared_and_reused(tmp_path, caplog):
    """Two jobs of a damping sweep (λ = 1e-3 and 1e-2): the first scores the shared pass, the second reads it from
    the cache, and both say so."""
    net, train = _tiny()
    caplog.set_level(logging.INFO, logger="influencelab")
    sweep = [1e-3, 1e-2]
    first = Attributor(net, solver="ekfac", damping=1e-3, shared_dampings=sweep, cache_dir=tmp_path).fit(train)
    s1 = first.self_influence()
    lines = _lines(caplog)
    assert any("scored in the sweep's shared pass over dampings 0.001, 0.01" in s for s in lines), lines
    assert not [s for s in lines if s.startswith("reusing cached self scores")]
    caplog.clear()
    second = Attributor(net, solver="ekfac", damping=1e-2, shared_dampings=sweep, cache_dir=tmp_path).fit(train)
    s2 = second.self_influence()
    lines = _lines(caplog)
    assert any(s.startswith("damping 0.01 scored in the sweep's shared pass") for s in lines), lines
    (reused,) = [s for s in lines if s.startswith("reusing cached self scores")]
    assert reused.endswith("(1 of 1 chunks computed earlier)"), reused
    alone = Attributor(net, solver="ekfac", damping=[1e-3, 1e-2]).fit(train).self_influence()
    torch.testing.assert_close(torch.cat([s1, s2]), alone)


def test_cg_and_lissa_runs_give_no_jit_script_future_warning():
    """In a fresh process (torch's AD decompositions not yet loaded), FutureWarnings as errors."""
    code = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
from influencelab import Attributor
g = torch.Generator().manual_seed(0)
x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
for s in ("cg", "lissa"):
    Attributor(net, solver=s, damping=1e-2, depth=20).fit(TensorDataset(x, y)).self_influence() if s == "lissa" \\
        else Attributor(net, solver=s, damping=1e-2).fit(TensorDataset(x, y)).self_influence()
"""
    r = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "jit.script" not in r.stderr, r.stderr[-2000:]

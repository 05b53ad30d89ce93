"""The memory budget of a scoring pass (``score.memory_gb``, ``Attributor(memory_gb=...)``, influencelab.memory):
query chunks score as the whole, the plan shrinks with the budget and refuses below the smallest one (naming it),
and a budgeted pass's measured peak (resident memory above the start, in a fresh process) stays within it.

Run as a script (``python tests/test_memory_budget.py SOLVER GB N_QUERY N_TRAIN HIDDEN``), this file measures one
pairwise and one self-influence pass and prints their peaks as JSON (what the budget test runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from influencelab import Attributor
from influencelab.errors import ConfigError
from influencelab.memory import GB, pairwise_bytes, plan_pairwise, plan_self, self_bytes, shape_of

REPO = Path(__file__).resolve().parents[1]


def small_problem(dtype=torch.float64):
    """A conv + MLP (77k parameters) whose 16 preconditioned queries take tens of MB in float64: a budget of a
    few tens of MB binds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 256), nn.ReLU(),
                          nn.Linear(256, 10)).to(dtype)
    x, y = torch.randn(80, 1, 8, 8, dtype=dtype), torch.randint(0, 10, (80,))
    queries = TensorDataset(torch.randn(16, 1, 8, 8, dtype=dtype), torch.randint(0, 10, (16,)))
    return model, TensorDataset(x, y), queries


@pytest.mark.parametrize("solver", ["ekfac", "identity"])
@pytest.mark.parametrize("damping", [1e-2, [1e-3, 1e-1]], ids=["one_damping", "two_dampings"])
def test_query_chunks_score_as_the_whole(solver, damping):
    """Pairwise and self-influence under a budget that chunks the queries (and may cut the batch) equal the
    unbudgeted scores to float64 round-off; a wrong slice, damping order or a missing chunk would be off by O(1)."""
    model, train, queries = small_problem()
    kw = dict(solver=solver, damping=damping, dtype="float64", score_batch_size=32)
    whole = Attributor(model, **kw).fit(train)
    ref_pw, ref_self = whole.pairwise(queries), whole.self_influence()
    chunked = Attributor(model, memory_gb=0.05, **kw).fit(train)
    pw = chunked.pairwise(queries)
    plan = chunked.members[0].plan
    assert 1 <= plan.query_chunk < len(queries), plan  # the budget binds: several passes over the training data
    self_inf = chunked.self_influence()
    assert pw.shape == ref_pw.shape == (len(chunked.dampings), 16, 80)
    scale = float(ref_pw.abs().max())
    torch.testing.assert_close(pw, ref_pw, rtol=1e-12, atol=1e-12 * scale)
    torch.testing.assert_close(self_inf, ref_self, rtol=1e-12, atol=1e-12 * float(ref_self.abs().max()))


def test_query_chunks_are_cached_under_their_own_keys_and_resume(tmp_path):
    """A chunked pass writes each query chunk's score chunks; the same call again reads them all back."""
    model, train, queries = small_problem()
    kw = dict(solver="identity", dtype="float64", score_batch_size=32, chunk_size=30, memory_gb=0.05,
              cache_dir=tmp_path)
    first = Attributor(model, **kw).fit(train).pairwise(queries)
    n_chunks = len(list((tmp_path).rglob("*chunk*")))
    again = Attributor(model, **kw).fit(train).pairwise(queries)
    assert torch.equal(first, again) and len(list(tmp_path.rglob("*chunk*"))) == n_chunks > 3


def test_plan_shrinks_with_the_budget_and_refuses_below_the_smallest():
    model, train, queries = small_problem(torch.float32)
    attr = Attributor(model, solver="ekfac", score_batch_size=64).fit(train)
    m = attr.members[0]
    shape = shape_of(m.solver, m.model, attr.train, n_damping=2, chunk_size=4096)
    n_query = 200
    full = pairwise_bytes(shape, n_query, n_query, 64)
    smallest = pairwise_bytes(shape, n_query, 1, 1)
    assert smallest < full
    budgets = torch.linspace(full * 1.2, smallest, 25).tolist()
    plans = [plan_pairwise(shape, n_query, 64, int(b)) for b in budgets]
    assert plans[0].query_chunk == n_query and plans[0].batch_size == 64
    assert plans[-1].query_chunk == 1 and plans[-1].bytes == smallest  # (the batch, if it no longer sets the peak, stays)
    for p, b in zip(plans, budgets):
        assert p.bytes <= b and p.bytes == pairwise_bytes(shape, n_query, p.query_chunk, p.batch_size)
    order = [(p.query_chunk, p.batch_size) for p in plans]
    assert order == sorted(order, reverse=True), order  # as the budget shrinks, so does the choice
    assert len({p.query_chunk for p in plans}) > 5
    with pytest.raises(ConfigError) as e:
        plan_pairwise(shape, n_query, 64, smallest - 1, key="score.memory_gb")
    msg = str(e.value)
    assert "\n" not in msg and "score.memory_gb" in msg and "1 query at a time, batch 1" in msg
    need = float(msg.split("needs at least score.memory_gb=")[1].split()[0])
    assert smallest <= need * GB < smallest * 1.01  # the smallest budget that works, rounded up
    assert plan_pairwise(shape, n_query, 64, int(need * GB)).query_chunk == 1
    # self-influence: only the batch
    s_plans = [plan_self(shape, 64, int(b)) for b in (self_bytes(shape, 64), self_bytes(shape, 8), self_bytes(shape, 1))]
    assert [p.batch_size for p in s_plans] == [64, 8, 1]
    with pytest.raises(ConfigError, match="the self-influence pass needs at least memory_gb="):
        plan_self(shape, 64, self_bytes(shape, 1) - 1)


def test_api_refuses_before_scoring_with_the_smallest_budget():
    model, train, queries = small_problem(torch.float32)
    with pytest.raises(ConfigError, match=r"memory_gb=-1 is invalid"):
        Attributor(model, solver="identity", memory_gb=-1)
    queries = TensorDataset(*queries[:4])
    attr = Attributor(model, solver="identity", memory_gb=0.001).fit(train)
    with pytest.raises(ConfigError) as e:
        attr.pairwise(queries)
    msg = str(e.value)
    need = float(msg.split("needs at least memory_gb=")[1].split()[0])
    assert "memory_gb=0.001 is below it" in msg and "\n" not in msg
    out = Attributor(model, solver="identity", memory_gb=need).fit(train).pairwise(queries)  # that budget works
    assert out.shape == (1, 4, 80)


def test_cli_bad_budget_is_one_line_exit_2(tmp_path):
    from conftest import run_cli

    r = run_cli(["logger=none", "score.memory_gb=-1", "stages=[train,fit,pairwise]"], tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "score.memory_gb=-1" in lines[0] and "> 0" in lines[0]


def test_cli_budget_too_small_names_the_config_key(run_pipeline):
    with pytest.raises(ConfigError, match=r"score\.memory_gb: the pairwise pass needs at least score\.memory_gb="):
        run_pipeline(["dataset.subset=200", "model=mlp", "trainer.epochs=1", "query.n=4",
                      "stages=[train,fit,pairwise]", "score.memory_gb=0.0001"])


def _measure(solver: str, gb: float, n_query: int, n_train: int, hidden: int, autocast: str = "") -> dict:
    r = subprocess.run([sys.executable, __file__, solver, str(gb), str(n_query), str(n_train), str(hidden),
                        *([autocast] if autocast else [])],
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("solver", "gb", "n_query", "hidden", "autocast"),
                         [("identity", 0.3, 200, 1024, ""), ("ekfac", 0.08, 50, 256, ""),
                          ("ekfac", 0.15, 200, 1024, "bf16")])
def test_budget_is_honoured(solver, gb, n_query, hidden, autocast):
    """An MLP (identity: 1.9M parameters, 200 queries: 1.5 GB per copy of them; EK-FAC: 0.27M, 50 queries; EK-FAC
    under bf16, whose gradients and queries are stored in half the bytes) in a fresh process: the pairwise and
    self-influence passes' peak resident memory above their start <= budget x 1.1, and the pairwise budget binds
    (the unbudgeted estimate is far above it)."""
    out = _measure(solver, gb, n_query, 32, hidden, autocast)
    assert out["pairwise"]["query_chunk"] < n_query and out["pairwise"]["unbudgeted_mb"] > 2 * gb * 1024, out
    for what in ("pairwise", "self"):
        assert out[what]["peak_mb"] <= gb * 1024 * 1.10, out


def main() -> None:
    import ctypes
    import gc

    sys.path.insert(0, str(REPO / "benchmarks"))
    from peers import PeakRSS  # the peak sampled as the benchmarks sample it

    solver, gb, n_query, n_train, hidden = sys.argv[1], float(sys.argv[2]), *map(int, sys.argv[3:6])
    autocast = sys.argv[6] if len(sys.argv) > 6 else None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10))
    train = TensorDataset(torch.randn(n_train, 1, 28, 28), torch.randint(0, 10, (n_train,)))
    queries = TensorDataset(torch.randn(n_query, 1, 28, 28), torch.randint(0, 10, (n_query,)))
    attr = Attributor(model, solver=solver, damping=1e-3, memory_gb=gb,
                      **({"autocast": autocast} if autocast else {})).fit(train)
    m = attr.members[0]
    out = {}
    for what, fn in (("pairwise", lambda: attr.pairwise(queries)), ("self", lambda: attr.self_influence())):
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap returned first: the pass's own growth is measured
        with PeakRSS() as p:
            scores = fn()
        out[what] = {"peak_mb": p.mb, "estimate_mb": m.plan.bytes / 2**20, "query_chunk": m.plan.query_chunk,
                     "batch_size": m.plan.batch_size}
        del scores
    shape = shape_of(m.solver, m.model, attr.train, 1, attr.chunk_size)
    out["pairwise"]["unbudgeted_mb"] = pairwise_bytes(shape, n_query, n_query, attr.batch_size) / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main()

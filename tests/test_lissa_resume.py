"""A LiSSA solve killed midway resumes from its last snapshot (issue 29's note: a run of hours restarted from zero):
the resumed solve ends with the same result as one never killed, records the same monitor rows, counts the solving
time before the snapshot, and leaves no snapshot behind. The kill is an exception raised from the monitor, as a
signal would stop the process between two steps; the dense float64 solve checks that the result is the solution."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import TensorDataset

from influencelab import Attributor
from influencelab.solvers.lissa import LiSSA
from influencelab.stages.ihvp import ErrorTrace
from test_convergence import _dense_ggn, _tiny

N = 64


class Killed(Exception):
    pass


class KillAt:
    """A monitor that records ``(iteration, mean norm)`` and raises :class:`Killed` at its ``at``-th call."""

    def __init__(self, at: int | None = None):
        self.at, self.rows = at, []

    def __call__(self, damping, iteration, x):
        self.rows.append((iteration, float(x.norm(dim=1).mean())))
        if self.at is not None and len(self.rows) == self.at:
            raise Killed


@pytest.fixture(scope="module")
def problem():
    net, x, y = _tiny(N)
    v = Attributor(net, solver=LiSSA(damping=1.0, depth=1, dtype="float64")).fit(
        TensorDataset(x, y)).query_gradients(TensorDataset(x[:2], y[:2]))
    return net, x, y, v


def _attr(problem, cache, checkpoint_s=3600.0, **kw):
    """A LiSSA (3 repeats of 8 steps, two dampings unless ``kw`` says otherwise); ``checkpoint_s``: within a repeat,
    the seconds between snapshots (the default: none but after each repeat)."""
    net, x, y, _ = problem
    kw = {"damping": [1.0, 0.3], "scale": 4.0, "depth": 8, "repeats": 3, "dtype": "float64", **kw}
    return Attributor(net, solver=LiSSA(**kw), cache_dir=cache, checkpoint_s=checkpoint_s).fit(TensorDataset(x, y))


def _snapshot_files(cache):
    return sorted(p.name for p in (cache / "snapshots").glob("solve-*")) if (cache / "snapshots").exists() else []


@pytest.mark.parametrize("repeats, kill_at", [(3, 4), (1, 11)], ids=["between-repeats", "within-a-repeat"])
def test_a_killed_solve_resumes_to_the_same_result(problem, tmp_path, monkeypatch, caplog, repeats, kill_at):
    """Killed at the end of the 2nd of 3 repeats (monitor call 4: two dampings; the snapshot after repeat 1 is the
    last), or
    at step 11 of a single 8 x 3 = 24-step repeat (snapshots every step here): the resumed solve equals the
    uninterrupted one to the last bit, its monitor rows continue where the snapshot was, and no snapshot is left."""
    monkeypatch.setattr(LiSSA, "SNAPSHOT_COST", 0.0)  # (the write-cost throttle is tested below)
    depth, every = (8, 3600.0) if repeats == 3 else (24, 0.0)  # (within a repeat: no snapshot, or after every step)
    v = problem[3]
    ref = _attr(problem, None, repeats=repeats, depth=depth)
    whole = KillAt()
    ref.solver.set_monitor(whole)
    expected = ref.precondition(v)

    attr = _attr(problem, tmp_path, every, repeats=repeats, depth=depth)
    attr.solver.set_monitor(KillAt(kill_at))
    with pytest.raises(Killed):
        attr.precondition(v)
    assert _snapshot_files(tmp_path), "the killed solve left no snapshot"

    again = _attr(problem, tmp_path, every, repeats=repeats, depth=depth)  # (a new process: a new solver, the same cache)
    rest = KillAt()
    again.solver.set_monitor(rest)
    with caplog.at_level(logging.INFO, logger="influencelab"):
        got = again.precondition(v)
    assert torch.equal(got, expected)
    resumed = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert len(resumed) == 1
    # monitor calls per damping: 2 (both dampings) per repeat or step; the resumed solve makes only those after it
    if repeats == 3:
        assert "from step 8 of 24" in resumed[0]
        assert rest.rows == whole.rows[2:]
    else:
        # killed at call 11 = step 6's first damping (calls 2 per step): the snapshot after step 5 is the last
        assert "from step 5 of 24" in resumed[0]
        assert rest.rows == whole.rows[10:]
    assert _snapshot_files(tmp_path) == []
    # the convergence record: the same iterations and held-out residuals (the held-out set is drawn from the points
    # the recursion did not visit: the visited ones are part of the snapshot)
    mine, theirs = again.solver.diagnostics(), ref.solver.diagnostics()
    assert [(c.iterations, c.rel_residual_max) for c in mine.values()] == [
        (c.iterations, c.rel_residual_max) for c in theirs.values()]


def test_a_resumed_solve_is_the_dense_solution_and_other_vectors_do_not_resume(problem, tmp_path, caplog):
    """Resumed across a kill, 4 repeats x 64 steps still solve the damped GGN system (dense float64 solve). The
    snapshot is found by the vectors' shape, not their bits, and checked by their signature: the same vectors
    perturbed in the last bits (as recomputed gradients can be) resume; other vectors of the same shape, and fewer
    vectors, start from the beginning (the former with a warning)."""
    net, x, y, v = problem

    def killed():
        attr = _attr(problem, tmp_path, damping=1.0, scale=4.0, depth=64, repeats=4)
        attr.solver.set_monitor(KillAt(2))  # (at the end of repeat 2: the snapshot after repeat 1 is the last)
        with pytest.raises(Killed):
            attr.precondition(v)

    def solve(vectors, kill_at=None):
        caplog.clear()
        attr = _attr(problem, tmp_path, damping=1.0, scale=4.0, depth=64, repeats=4)
        attr.solver.set_monitor(KillAt(kill_at))  # (monitored, like the killed one)
        with caplog.at_level(logging.INFO, logger="influencelab"):
            try:
                out = attr.precondition(vectors)
            except Killed:
                out = None
        return attr, out, [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()], [
            r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    killed()
    _, _, resumed, _ = solve(v[:1])  # (fewer vectors: another key)
    assert not resumed
    swapped = v.flip(0)  # (other vectors, the same shape: the signature differs)
    _, _, resumed, warned = solve(swapped, kill_at=3)  # (killed after repeat 3: a later snapshot than v's next)
    assert not resumed and any("other vectors" in w for w in warned)
    killed()
    noisy = v * (1 + 1e-9 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0), dtype=v.dtype))
    assert not torch.equal(noisy, v)
    again, got, resumed, _ = solve(noisy)
    assert resumed and "from step 64 of 256" in resumed[0]
    G, names = _dense_ggn(again.model, x)

    def to_params(t):
        d = again.solver.layout.unflatten(t, again.model)
        return torch.cat([d[k].reshape(len(t), -1) for k in names], 1)

    exact = torch.linalg.solve(G + torch.eye(len(G), dtype=G.dtype), to_params(v).T).T
    err = (to_params(got.reshape(len(v), -1)) - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(err.max()) < 0.1


def test_the_error_trace_keeps_its_rows_and_clock_across_a_resume(problem, tmp_path, monkeypatch):
    """The ihvp stage's error trace: the resumed solve's trace has every row of the uninterrupted one (iterations and
    errors), its times continue from the snapshot's (non-decreasing, the first rows as recorded before the kill),
    and its clock counts the solving before the snapshot."""
    v = problem[3]
    target = _attr(problem, None, damping=1.0).precondition(v)
    whole = ErrorTrace(target)
    ref = _attr(problem, None, damping=1.0)
    ref.solver.set_monitor(whole)
    ref.precondition(v)

    class Dying(ErrorTrace):
        def __call__(self, damping, iteration, x):
            super().__call__(damping, iteration, x)
            if len(self.errors) == 2:
                raise Killed

    dying = Dying(target)
    attr = _attr(problem, tmp_path, damping=1.0)
    attr.solver.set_monitor(dying)
    with pytest.raises(Killed):
        attr.precondition(v)
    before = dying.times[0]  # the snapshot after repeat 1 has this row (the 2nd was recorded after it)

    trace = ErrorTrace(target)
    again = _attr(problem, tmp_path, damping=1.0)
    again.solver.set_monitor(trace)
    again.precondition(v)
    assert trace.iterations == whole.iterations == [8, 16, 24]
    assert trace.errors == pytest.approx(whole.errors, abs=0, rel=1e-12)
    assert trace.times[0] == before
    assert trace.times == sorted(trace.times) and trace.elapsed() >= before


def test_writing_a_snapshot_slowly_makes_snapshots_rarer(problem, tmp_path, monkeypatch):
    """Within a repeat, snapshots are at most every SNAPSHOT_COST x the last write's time: with writes made to take
    50 ms and a cost factor of 20 (1 s between snapshots), a 24-step repeat of ~ms steps writes far fewer snapshots
    than steps; its result is unchanged."""
    from influencelab.cache import Snapshots

    writes = []
    real = Snapshots.save

    def slow(self, phase, done, tensors, final=False):
        import time

        time.sleep(0.05)
        writes.append(done)
        return real(self, phase, done, tensors, final)

    monkeypatch.setattr(Snapshots, "save", slow)
    v = problem[3]
    expected = _attr(problem, None, damping=1.0, depth=24, repeats=1).precondition(v)
    got = _attr(problem, tmp_path, 0.0, damping=1.0, depth=24, repeats=1).precondition(v)
    assert torch.equal(got, expected)
    assert 1 <= len(writes) < 6

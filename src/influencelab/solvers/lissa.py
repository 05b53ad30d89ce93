"""LiSSA (Agarwal et al. 2017): the stochastic Neumann recursion
``h_0 = v,  h_j = v + (I - (G_batch + λI) / s) h_{j-1}``, result ``h_J / s`` (averaged over ``repeats``),
with exact curvature-vector products on a seeded stream of training batches. All query vectors, and all
dampings of a list, iterate together (one vmapped product per step). ``scale="auto"`` sets
``s = 2 * λ_max(G) + λ`` per damping, ``λ_max`` from a few power-iteration steps: the recursion converges when
``s`` exceeds the largest eigenvalue of ``G_batch + λI``; the factor 2 covers a mini-batch's larger top eigenvalue,
and ``+ λ`` the damping, which is exact (without it, any λ above ~3 λ_max diverges). A fixed ``scale`` is used
as given for every damping; divergence stops with the scale the measured norm growth calls for (a growth by ``g``
per step means an eigenvalue ``≈ s (1 + g)`` of ``G_batch + λI``; suggested ``s (1 + g)``).

Diverged means: NaN/inf, or after ``j`` steps an iterate's norm above ``2 (j + 1)`` times the first one's -- a
recursion whose every step is a contraction (``s >= λ_max(G_batch + λI) / 2``) adds at most ``||h_0||`` per step,
so only a step that expands can pass that bound. It is checked after every step.

**Tuned as users tune it** (``scale=search``, ``depth=auto``; Koh & Liang's and dattri's practice): per damping,
the scale is the smallest of ``scale_start x {1, 10, 100, ...}`` (``scale_start`` 1 by default) whose recursion does
not diverge over the whole solve -- the dampings still searching iterate together, and one that diverges drops out
and retries at the next scale, so the result is that of the first non-diverging scale, and the time of the scales
tried counts as the solve's; ``depth=auto`` runs ``ceil(n / repeats)`` steps (depth x repeats ~ n, the training set's
size), ``repeats`` recursions on their own batch streams averaged. The rule applied -- the scales tried (and where
each diverged), the one chosen, the depth and repeats -- is recorded with the result per damping
(:class:`~.base.Convergence` ``rule``, ``scale``, ``iterations``, ``repeats``; ``solver/rule@λ`` and so on).

**An unconverged damping names a setting that would converge** (``Convergence.suggest``, in the warning): from the
held-out residuals of the iterate after half the depth and after all of it, the late per-step contraction, and the
depth at which it reaches ``converged_tol``, times 1.5; or, when the residual stopped falling (the recursion's
sampling noise), the repeats that would average it down (:meth:`LiSSA._suggest`).

Preconditioned (``preconditioner: ekfac | kfac``, ASTRA, arXiv 2507.14740): the same recursion written on the
iterate, ``x_0 = P^-1 v / s,  x_j = x_{j-1} + P^-1 (v - (G_batch + λI) x_{j-1}) / s`` (with ``P = I`` it is the
plain one, ``x_j = h_j / s``), ``P^-1`` the fitted EK-FAC/K-FAC inverse at ``preconditioner_damping`` (see
:mod:`~influencelab.solvers.preconditioner`); ``scale="auto"`` then sets ``s = 2 μ_max`` per damping, ``μ_max`` the
top eigenvalue of ``P^-1 (G_S + λI)`` by power iteration on the same seeded sample ``S``. It converges to the same
``(G + λI)^-1 v``, at a rate set by ``μ_min / s``: fast when ``P`` matches ``G`` well, slower than the plain
recursion when ``P^-1 (G + λI)`` is worse conditioned than ``G + λI`` (``experiments/precond_spectrum.py``
measures both).

Every call records its convergence per damping (:meth:`~.iterative.IterativeSolver.diagnostics`): depth, scale and
the relative residual ``||(G_H + λI) x - v|| / ||v||`` of each vector, with ``G_H`` the mean curvature over a
held-out set ``H`` of ``check_size(n)`` training points (``check_examples``; ``auto``: all ``n`` when the recursion
draws at least ``n`` points, ``depth x batch_size x repeats >= n``, so the residual is exact and has no sampling
noise at no more than the solve's cost; else ``min(8 * batch_size, n)``): a seeded sample (``seed + 104729``) of the points
the recursion's batches did not visit in any repeat of that call when at least that many are left ("disjoint");
otherwise (the recursion visited nearly every point) the same-size seeded sample of the whole training set
("resampled": batches the recursion never drew as such; ``H`` is the whole set when ``n <= 8 * batch_size``, then
the residual is exact). ``G_H`` is a sample estimate of ``G``, so the residual carries its sampling noise.
Converged = the worst vector's residual <= ``converged_tol`` (default 0.1: the solution reproduces ``v`` to 10%)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.base import LabeledData
from ..errors import SolverDivergedError, check
from ..progress import progress
from .base import Convergence, Damping
from .iterative import IterativeSolver

log = logging.getLogger(__name__)


class LiSSA(IterativeSolver):
    name = "lissa"
    iteration_key = "depth"
    #: the held-out set's size, in batches, and the offset of its seed
    HELD_OUT_BATCHES, HELD_OUT_SEED = 8, 104729
    #: ``scale=search`` tries ``scale_start x SEARCH_FACTOR^k``, k = 0, 1, ... SEARCH_STEPS - 1
    SEARCH_FACTOR, SEARCH_STEPS = 10.0, 16
    #: an unconverged solve's suggested depth (or repeats) is the estimate times this margin, rounded up
    SUGGEST_MARGIN = 1.5
    #: within a repeat, a snapshot of a resumable solve at most every this many times the last one's write time
    SNAPSHOT_COST = 20.0

    def __init__(self, *args: Any, depth: int | str = 200, scale: float | str = "auto", repeats: int = 1,
                 scale_start: float = 1.0, converged_tol: float = 0.1, check_examples: int | str = "auto",
                 preconditioner: Any = None, preconditioner_damping: Any = "same", **kwargs: Any):
        kwargs.setdefault("batch_size", 32)
        super().__init__(*args, preconditioner=preconditioner, preconditioner_damping=preconditioner_damping,
                         **kwargs)
        self._pscale: dict[float, float] = {}  # preconditioned scale=auto: 2 mu_max per damping
        check(depth == "auto" or (isinstance(depth, int) and not isinstance(depth, bool) and depth >= 1),
              "solver.depth", depth, "must be an integer >= 1 or auto (ceil(n / solver.repeats))")
        check(isinstance(repeats, int) and repeats >= 1, "solver.repeats", repeats, "must be an integer >= 1")
        check(scale in ("auto", "search") or (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                               and scale > 0), "solver.scale", scale, "must be > 0, auto or search")
        check(isinstance(scale_start, (int, float)) and scale_start > 0, "solver.scale_start", scale_start,
              "must be > 0 (the first scale solver.scale=search tries)")
        check(isinstance(converged_tol, (int, float)) and converged_tol > 0, "solver.converged_tol", converged_tol,
              "must be > 0")
        check(check_examples in ("auto", "all") or (isinstance(check_examples, int) and not isinstance(
            check_examples, bool) and check_examples >= 1), "solver.check_examples", check_examples,
            "must be auto, all or an integer >= 1 (training points the residual is measured on)")
        self.depth, self.scale, self.repeats = depth, scale, repeats
        self.check_examples = check_examples
        self._scale_start = float(scale_start)  # (in the fit key only with scale=search, see fit_config)
        self._converged_tol = float(converged_tol)  # (private: not part of the fit's cache key)
        self._scale: float | None = None

    def fit(self, model: nn.Module, data: LabeledData, snapshots=None) -> None:
        """Keeps the model and data; estimates ``λ_max`` for ``scale=auto`` (preconditioned: ``μ_max`` per damping
        on first use, once the preconditioner is fitted). ``scale=search`` chooses its scale per damping when
        solving."""
        self.bind(model, data)
        if self.scale == "auto":  # (preconditioned: the scale is per damping, see _scales)
            self._scale = 2.0 * self._top_eigenvalue() if not self.preconditioned else 0.0
        elif self.scale == "search":
            self._scale = 0.0
        else:
            self._scale = float(self.scale)

    def fit_config(self) -> dict[str, Any]:
        cfg = super().fit_config()
        if self.scale == "search":  # (other scales keep their existing keys)
            cfg["scale_start"] = self._scale_start
        return cfg

    @property
    def steps(self) -> int:
        """The recursion depth: ``solver.depth``, or for ``depth=auto`` ``ceil(n / repeats)`` with ``n`` the training
        set's size (depth x repeats ~ n)."""
        if self.depth != "auto":
            return int(self.depth)
        assert self._data is not None, "fit the solver first"
        return max(1, math.ceil(len(self._data) / self.repeats))

    def scale_grid(self) -> list[float]:
        """The scales ``scale=search`` tries, in order: ``scale_start x 10^k``."""
        return [self._scale_start * self.SEARCH_FACTOR ** i for i in range(self.SEARCH_STEPS)]

    def _top_eigenvalue(self, iters: int = 20) -> float:
        assert self._curv is not None and self._data is not None and self.layout is not None
        x, y, g = self._sample()
        v = torch.randn(1, self.layout.size, generator=g).to(self._curv.device, self._curv.dtype)
        lam = 0.0
        for _ in range(iters):
            w = self._curv.product(v / v.norm(), x, y)
            lam = float((w * v / v.norm()).sum())
            v = w
        return max(lam, 1e-12)

    @property
    def converged_tol(self) -> float:
        """A result counts as converged when its worst held-out relative residual is at most this."""
        return self._converged_tol

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(self._scale or 0.0, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._scale = float(state["scale"])

    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        return self.precondition_all(v, [damping])[0]

    def precondition_all(self, v: torch.Tensor, dampings: Sequence[Damping]) -> torch.Tensor:
        assert self._curv is not None and self._data is not None and self._scale is not None, "fit the solver first"
        k, d = len(v), len(dampings)
        lams = [self.resolve_damping(x) for x in dampings]
        V = v.to(self._curv.dtype)
        out = torch.empty(d * k, V.shape[1], dtype=V.dtype, device=V.device)
        depth = self.steps
        reps = f"{self.repeats} repeat{'s' if self.repeats > 1 else ''} averaged"
        how = (f"depth=auto: ceil(n / repeats) = ceil({len(self._data)} / {self.repeats}) = {depth}, {reps}"
               if self.depth == "auto" else f"depth {depth}, {reps}")
        if self.scale != "search":
            scales = self._scales(lams).tolist()
            run = self._run(V, lams, scales, list(dampings), k, depth)
            for i, div in enumerate(run.diverged):
                if div is not None:
                    raise SolverDivergedError(self._diverged_message(div, scales[i], dampings[i], fixed=True))
            rule = "scale fixed" if self.scale != "auto" else (
                "scale=auto: 2 μ_max(P^-1 (G_S + λI))" if self.preconditioned else "scale=auto: 2 λ_max(G_S) + λ")
            self._record_convergence(run, V, lams, scales, list(dampings), k, [run.elapsed / d] * d,
                                     [f"{rule} = {sc:.4g}; {how}" for sc in scales], list(range(d)), out)
            return out.reshape(d, k, -1).to(v.dtype)
        # scale=search: per damping, the smallest scale of the grid whose recursion does not diverge (all dampings
        # still searching iterate together; a damping whose recursion diverges drops out and retries at 10x)
        grid = self.scale_grid()
        at, tried, spent = [0] * d, [[] for _ in range(d)], [0.0] * d
        pending = list(range(d))
        while pending:
            scales = [grid[at[i]] for i in pending]
            run = self._run(V, [lams[i] for i in pending], scales, [dampings[i] for i in pending], k, depth)
            done = []
            for pos, i in enumerate(pending):
                spent[i] += run.elapsed / len(pending)  # (every scale tried is part of the cost)
                div = run.diverged[pos]
                tried[i].append(f"{scales[pos]:g}" + ("" if div is None else f" (diverged at step {div.step})"))
                if div is None:
                    done.append(pos)
                elif at[i] + 1 == len(grid):
                    raise SolverDivergedError(self._diverged_message(div, scales[pos], dampings[i], fixed=False))
                else:
                    at[i] += 1
            rules = [f"scale=search: tried {', '.join(tried[pending[pos]])}; chose {scales[pos]:g}, the smallest of "
                     f"{self._scale_start:g} x 10^k whose recursion's norm stayed within 2 (j + 1) ||h_0||; {how}"
                     for pos in range(len(pending))]
            self._record_convergence(run, V, [lams[i] for i in pending], scales, [dampings[i] for i in pending], k,
                                     [spent[i] for i in pending], rules, pending, out, keep=done)
            pending = [i for pos, i in enumerate(pending) if pos not in done]
        return out.reshape(d, k, -1).to(v.dtype)

    def _run(self, V: torch.Tensor, lams: Sequence[float], scales: Sequence[float], dampings: Sequence[Damping],
             k: int, depth: int) -> _Run:
        """The recursion for the ``k`` vectors ``V`` at each damping (with its scale), all together, ``repeats``
        times averaged. A damping whose recursion diverges -- NaN/inf, or an iterate's norm above ``2 (j + 1)`` times
        the first one's after ``j`` steps: a non-diverging recursion adds at most ``||h_0||`` per step -- stops
        there (the others go on); its step and per-step norm growth are returned.

        Resumable (:meth:`~.iterative.IterativeSolver.set_resume`): the state is snapshotted after each repeat and,
        within one, at most every ``every_s`` seconds but no more often than every :attr:`SNAPSHOT_COST` x the last
        snapshot's write time (the state is three ``[d k, P]`` tensors: gigabytes on ResNet-18), so that writing costs
        at most ~5%. A killed solve restarts at its last snapshot's step with the same batches (each repeat's stream is seeded),
        so it ends with the same result; its time counts the solving before the snapshot, not the writing or the
        steps redone. The monitor's rows are part of the state (its ``state_dict``/``load_state_dict``, if it has
        them; its ``pause(seconds)`` is told the writing time)."""
        assert self._curv is not None and self._data is not None
        t_start = time.perf_counter()
        d = len(lams)
        dt = dict(dtype=V.dtype, device=V.device)
        lam = self.row_dampings(lams, k, V.dtype, V.device)
        s = torch.tensor(list(scales), **dt).repeat_interleave(k)[:, None]
        Vr = V.repeat(d, 1)  # [d*k, P], damping-major
        x0 = self._precondition_rows(Vr, lam) / s  # the first step from x = 0
        x0norm = x0.norm(dim=1).clamp_min(1e-30)
        st = _State(torch.zeros_like(Vr), torch.zeros_like(Vr), torch.zeros(len(self._data), dtype=torch.bool),
                    torch.ones(d, dtype=torch.bool), [None] * d)
        mid = depth // 2  # the iterate after mid steps is kept (contraction estimate of an unconverged solve)
        snaps = self._solve_snapshots(V, dampings=list(lams), scales=list(scales), depth=depth, repeats=self.repeats)
        done, every = 0, snaps.every_s if snaps is not None else 0.0
        signature = self.vector_signature(V) if snaps is not None else None
        hit = snaps.load("lissa") if snaps is not None else None
        if hit is not None and not self.same_vectors(hit[1].get("v_signature"), signature):
            log.warning("%s: the snapshot of this solve's model, settings and shape is of other vectors: "
                        "solving from the beginning", self.label)
            hit = None
        if hit is None and snaps is not None:
            snaps.clear()  # (no slot of another solve may outlive this one's first snapshot)
        if hit is not None:
            done, elapsed = st.load(hit, self._monitor)
            del hit  # (its tensors are copied into st)
            t_start = time.perf_counter() - elapsed
            log.info("resuming %s from step %d of %d (snapshot; %.0f s of solving before it)", self.label, done,
                     depth * self.repeats, elapsed)
        last = time.perf_counter()

        def snapshot(steps: int) -> None:
            nonlocal t_start, last, every
            t0 = time.perf_counter()
            assert snaps is not None
            snaps.save("lissa", steps, st.tensors(t0 - t_start, self._monitor) | {"v_signature": signature},
                       final=True)
            last = time.perf_counter()
            wrote = last - t0
            t_start += wrote  # (writing is not solving)
            every = max(snaps.every_s, self.SNAPSHOT_COST * wrote)
            if hasattr(self._monitor, "pause"):
                self._monitor.pause(wrote)

        rep0, j0 = divmod(done, depth)
        for rep in range(rep0, self.repeats):
            start = j0 if rep == rep0 else 0
            x = st.x.to(x0) if start else x0.clone()
            norms = st.norms if start else [x0norm]
            st.x = None
            batches = self._stream(rep)
            for _ in range(start):  # (the batches the snapshot's steps used)
                next(batches)
            for j in progress(range(start, depth), desc=self.label):
                rows = st.active.repeat_interleave(k)
                xb, yb, pos = next(batches)
                st.visited[pos] = True
                if bool(rows.all()):
                    x = x + self._precondition_rows(Vr - (self._curv.product(x, xb, yb) + lam * x), lam) / s
                else:
                    xa, la = x[rows], lam[rows]
                    x[rows] = xa + self._precondition_rows(Vr[rows] - (self._curv.product(xa, xb, yb) + la * xa),
                                                           la) / s[rows]
                norm = x.norm(dim=1)
                norms = [*norms[-4:], norm]
                bad = ((~torch.isfinite(norm)) | (norm > 2 * (j + 2) * x0norm)).reshape(d, k).any(1) & st.active
                for i in bad.nonzero().flatten().tolist():
                    st.diverged[i] = _Diverged(j + 1, _growth(norms, slice(i * k, (i + 1) * k)))
                    st.active[i] = False
                if not bool(st.active.any()):
                    break
                if self._monitor is not None and self.repeats == 1:
                    for i, damping in enumerate(dampings):
                        if st.active[i]:
                            self._monitor(damping, j + 1, x[i * k:(i + 1) * k])
                if j + 1 == mid:
                    st.half += x
                if snaps is not None and j + 1 < depth and time.perf_counter() - last >= every:
                    st.x, st.norms = x, norms
                    snapshot(rep * depth + j + 1)
                    st.x = None  # (not kept alive: it is [d k, P])
            if not bool(st.active.any()):
                break
            st.total += x
            if self._monitor is not None and self.repeats > 1:  # the average of the repeats done: what stopping
                for i, damping in enumerate(dampings):          # here would return, after (rep + 1) x depth steps
                    if st.active[i]:
                        self._monitor(damping, (rep + 1) * depth, st.total[i * k:(i + 1) * k] / (rep + 1))
            if snaps is not None and rep + 1 < self.repeats:
                st.x, st.norms = None, []
                snapshot((rep + 1) * depth)
        if snaps is not None:
            snaps.clear()
        return _Run(st.total / self.repeats, st.half / self.repeats, mid, st.visited, st.diverged, s, lam,
                    time.perf_counter() - t_start)

    def _diverged_message(self, div: _Diverged, scale: float, damping: Damping, fixed: bool) -> str:
        """The divergence error, with the scale the measured norm growth calls for: a growth by ``g`` per step
        means an eigenvalue ``μ ≈ s (1 + g)`` of ``G_batch + λI`` (``|1 - μ / s| = g``), and the recursion needs
        ``s > μ / 2``; suggested ``s (1 + g)`` (twice that, as ``scale=auto``'s factor 2)."""
        pre = f" (preconditioned by {self.preconditioner_name})" if self.preconditioned else ""
        need = _round_up(scale * (1 + div.growth)) if div.growth is not None else _round_up(10 * scale)
        basis = (f"its norm grew {div.growth:.3g}x per step: an eigenvalue near {scale * (1 + div.growth):.3g}"
                 if div.growth is not None else "no finite growth to measure")
        what = ("use a larger solver.scale (e.g. {need:.3g}) or solver.scale=search" if fixed else
                "the largest scale of the search diverged too; use a larger solver.scale_start (e.g. {need:.3g})")
        return (f"LiSSA{pre} diverged at step {div.step} (scale {scale:.3g}, damping {damping}; {basis}); "
                f"{what.format(need=need)}, or a larger solver.damping")

    def _scales(self, lams: Sequence[float]) -> torch.Tensor:
        """The scale ``s`` (1 / step size) per damping. Plain: ``2 λ_max(G) + λ`` (auto) or the fixed scale.
        Preconditioned: ``2 μ_max`` with ``μ_max`` the top eigenvalue of ``P^-1 (G + λI)`` (power iteration on the
        same sample as ``λ_max``; cached per λ), or the fixed scale."""
        dt = dict(dtype=self._curv.dtype, device=self._curv.device)
        if self.scale != "auto":
            return torch.full((len(lams),), float(self._scale), **dt)
        if not self.preconditioned:
            return torch.tensor(lams, **dt) + self._scale
        missing = [lv for lv in dict.fromkeys(lams) if lv not in self._pscale]
        if missing:
            for lv, mu in zip(missing, self._top_preconditioned(missing)):
                self._pscale[lv] = 2.0 * mu
        return torch.tensor([self._pscale[lv] for lv in lams], **dt)

    def _sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """The seeded sample of ``8 x batch_size`` training points the power iterations use."""
        assert self._data is not None
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(self._data), generator=g)[: 8 * self.batch_size]
        return self._data.images(idx), self._data.targets[idx], g

    def _top_preconditioned(self, lams: Sequence[float], iters: int = 20) -> list[float]:
        """Top eigenvalue of ``P^-1 (G_S + λI)`` per λ (all together; ``G_S`` on :meth:`_sample`)."""
        pre = self._preconditioner()
        assert self._curv is not None and self.layout is not None and pre is not None
        x, y, g = self._sample()
        lam = torch.tensor(list(lams), dtype=self._curv.dtype, device=self._curv.device)[:, None]
        u = torch.randn(len(lams), self.layout.size, generator=g).to(self._curv.device, self._curv.dtype)
        mu = torch.ones(len(lams), dtype=self._curv.dtype, device=self._curv.device)
        for _ in range(iters):
            u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)
            w = pre.apply(self._curv.product(u, x, y) + lam * u, lam)
            mu = w.norm(dim=1)
            u = w
        return [max(float(m), 1e-12) for m in mu]

    def check_size(self, n: int) -> int:
        """How many training points the residual is measured on: ``solver.check_examples``; ``auto`` = all ``n``
        when the recursion draws at least as many (``depth x batch_size x repeats >= n``: the exact residual, no
        sampling noise, for at most the solve's own cost), else ``8 x batch_size``."""
        if self.check_examples == "all":
            return n
        if self.check_examples == "auto":
            if n <= self.steps * self.batch_size * self.repeats:
                return n
            return min(self.HELD_OUT_BATCHES * self.batch_size, n)
        return min(int(self.check_examples), n)

    def held_out(self, visited: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Positions of the held-out set given the points the recursion ``visited`` (see the module doc)."""
        n = len(visited)
        m = self.check_size(n)
        g = torch.Generator().manual_seed(self.seed + self.HELD_OUT_SEED)
        free = (~visited).nonzero().flatten()
        if len(free) >= m:
            pick = free[torch.randperm(len(free), generator=g)[:m]].sort().values
            return pick, f"held-out: {m} of the {len(free)} training points the recursion did not visit (disjoint)"
        pick = torch.randperm(n, generator=g)[:m].sort().values
        what = "all" if m == n else f"{m} of"
        return pick, f"held-out: {what} {n} training points, resampled (the recursion visited {int(visited.sum())})"

    def _record_convergence(self, run: _Run, V: torch.Tensor, lams: Sequence[float], scales: Sequence[float],
                            dampings: Sequence[Damping], k: int, solve_s: Sequence[float], rules: Sequence[str],
                            index: Sequence[int], out: torch.Tensor, keep: Sequence[int] | None = None) -> None:
        """For the run's dampings at positions ``keep`` (all by default): the solution into ``out``'s rows of damping
        ``index[pos]``, and the convergence record: the relative residuals of the rows on the held-out set, the rule
        applied (``rules``), and for an unconverged damping the setting estimated to converge (:meth:`_suggest`,
        from the residual of the iterate kept at half depth)."""
        assert self._data is not None
        keep = list(range(len(lams))) if keep is None else list(keep)
        if not keep:
            return
        t0 = time.perf_counter()
        idx, on = self.held_out(run.visited)
        held = self._data.subset(idx)

        def rows(positions: Sequence[int]) -> torch.Tensor:
            return torch.cat([torch.arange(p * k, (p + 1) * k) for p in positions]).to(run.x.device)

        X = run.x[rows(keep)]
        rel, noise = self._residuals(X, V.repeat(len(keep), 1), run.lam[rows(keep)], held)
        rel, noise = rel.reshape(len(keep), k), noise.reshape(len(keep), k)
        unconverged = [q for q in range(len(keep)) if float(rel[q].max()) > self.converged_tol]
        if unconverged:
            r = rows([keep[q] for q in unconverged])
            rel_half = self._residuals(run.half[r], V.repeat(len(unconverged), 1), run.lam[r], held)[0]
            rel_half = rel_half.reshape(len(unconverged), k)
        seconds = (time.perf_counter() - t0) / len(keep)
        depth = self.steps
        for q, p in enumerate(keep):
            i = index[p]
            out[i * k:(i + 1) * k] = X[q * k:(q + 1) * k]
            worst = float(rel[q].max())
            suggest, why = None, ""
            if q in unconverged:
                suggest, why = self._suggest(rel_half[unconverged.index(q)], rel[q], run.mid, depth, noise[q],
                                             len(held))
            self._record(dampings[p], Convergence(
                float(lams[p]), depth, worst, float(rel[q].mean()), self.converged_tol, worst <= self.converged_tol,
                k, on, scale=float(scales[p]), measure_s=seconds, solve_s=solve_s[p],
                preconditioner=self.preconditioner_name, repeats=self.repeats, rule=rules[p] + why,
                suggest=suggest, floor=float(noise[q].max())))

    def _residuals(self, X: torch.Tensor, V: torch.Tensor, lam: torch.Tensor, held: LabeledData
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``||(G_H + λI) x - v|| / ||v||`` per row, ``G_H`` the mean curvature over ``held``, and the part of it
        that is the held-out sample's own noise, ``||(G_H - G) x|| / ||v||`` (what even the exact solution shows on
        this sample), estimated from the sample's two halves (alternate batches): ``(G_H1 - G_H2) x`` has ``1/m1 +
        1/m2`` times the covariance of one point's, ``(G_H - G) x`` ``1/m - 1/n`` times it (a sample of ``m`` of the
        ``n`` training points; 0 when the held-out set is all of them)."""
        assert self._curv is not None and self._data is not None
        GX = [torch.zeros_like(X), torch.zeros_like(X)]
        m = [0, 0]
        for i, (x, y, _) in enumerate(held.batches(self.batch_size)):
            GX[i % 2] += self._curv.product(X, x, y) * len(y)
            m[i % 2] += len(y)
        r = V - ((GX[0] + GX[1]) / len(held) + lam * X)
        vn = V.norm(dim=1).clamp_min(1e-300)
        rel = torch.where(V.norm(dim=1) > 0, r.norm(dim=1) / vn, r.norm(dim=1))
        n, total = len(self._data), len(held)
        if min(m) == 0 or total >= n:
            return rel, torch.zeros_like(rel)
        d = (GX[0] / m[0] - GX[1] / m[1]).norm(dim=1) / vn
        return rel, d * math.sqrt((1 / total - 1 / n) / (1 / m[0] + 1 / m[1]))

    def _suggest(self, r_half: torch.Tensor, r_full: torch.Tensor, mid: int, depth: int, noise: torch.Tensor,
                 m: int) -> tuple[dict[str, float], str]:
        """The setting estimated to converge an unconverged damping, from each vector's held-out residual after
        ``mid`` steps (``r_half``; 1 at ``mid = 0``, the zero iterate) and after ``depth`` (``r_full``), and why.

        * Contracting (the residual fell between the two): per-step rate ``ρ = (r_full / r_half)^(1 / (depth -
          mid))``, and ``depth + log(tol / r_full) / log ρ`` steps reach ``converged_tol`` (the slowest vector
          decides); suggested ``depth`` = that x :data:`SUGGEST_MARGIN`, rounded up to two digits. The late rate is
          the slow modes' (the fast ones are gone by half depth), so the estimate extrapolates the right one.
        * Stalled (it did not fall by 1%): more steps do not help; the residual is the recursion's sampling noise,
          which averaging ``r`` independent repeats divides by about ``√r``: suggested ``repeats`` = ``repeats x
          (r_full / tol)^2`` x the margin (under ``depth=auto`` with the depth it ran, or the one suggested: more
          repeats would otherwise shorten each recursion). A limit: when part of the stall is slow contraction that
          the noise hides, more repeats lower the residual less than that (measured on a tiny MLP: 23x the repeats,
          residual 0.39 -> 0.20, not the 4.8x fall noise alone would give), and the next run's warning asks again.
        * At the measurement's noise (the held-out sample's own, ``noise``: over half the residual): no depth or
          repeats lowers it; a larger held-out set does (``m`` of ``n`` points: the noise scales as ``sqrt(1/m -
          1/n)``): suggested ``check_examples`` for a noise of ``tol / 2``."""
        tol, need, stalled, rates, measured = self.converged_tol, float(depth), 0.0, [], 0.0
        for a, b, z in zip(r_half.tolist(), r_full.tolist(), noise.tolist(), strict=True):
            if b <= tol:
                continue
            if z > 0.5 * b:
                measured = max(measured, z)
            elif b < 0.99 * a:
                rho = (b / a) ** (1.0 / (depth - mid))
                rates.append(rho)
                need = max(need, depth + math.log(tol / b) / math.log(rho))
            else:
                stalled = max(stalled, b)
        worst_h, worst = float(r_half.max()), float(r_full.max())
        why = f"; unconverged: worst residual {worst_h:.3g} at depth {mid}, {worst:.3g} at {depth}"
        suggest: dict[str, float] = {}
        if need > depth:
            suggest["depth"] = int(_round_up(need * self.SUGGEST_MARGIN))
            why += (f"; contraction {max(rates):.6g} per step (slowest vector) reaches {tol:g} in about "
                    f"{math.ceil(need)} steps: suggested depth {suggest['depth']} ({self.SUGGEST_MARGIN:g}x)")
        if stalled:
            suggest["repeats"] = int(_round_up(self.repeats * (stalled / tol) ** 2 * self.SUGGEST_MARGIN))
            why += (f"; stalled at {stalled:.3g} (sampling noise): averaging repeats divides it by about sqrt(r), "
                    f"suggested repeats {suggest['repeats']}")
            if self.depth == "auto":  # (ceil(n / repeats) would shorten each recursion: keep its depth)
                suggest["depth"] = suggest.get("depth", depth)
                why += f" at depth {suggest['depth']}"
        if measured:
            assert self._data is not None
            n = len(self._data)
            # sqrt(1/m' - 1/n) = (tol / 2) / measured x sqrt(1/m - 1/n)
            inv = (0.5 * tol / measured) ** 2 * (1 / m - 1 / n) + 1 / n
            size = min(n, math.ceil(1 / inv))
            suggest["check_examples"] = size
            why += (f"; at the held-out sample's own noise {measured:.3g} (the residual the exact solution shows on "
                    f"these {m} points, from their two halves): no depth or repeats lowers it; a check on "
                    f"{size} points (solver.check_examples={size}; all {n}: no noise) would bring it to {tol / 2:g}")
        return suggest, why

    def _stream(self, rep: int):
        """An endless seeded stream of training batches ``(x, y, positions)`` (reshuffled each epoch)."""
        assert self._data is not None
        epoch = 0
        while True:
            yield from self._data.batches(self.batch_size, shuffle=True, seed=self.seed + 7919 * rep + epoch)
            epoch += 1


@dataclass
class _Diverged:
    """Where a damping's recursion diverged: the step, and the per-step growth of its norm (None: not measurable)."""

    step: int
    growth: float | None


@dataclass
class _Run:
    """One recursion over several dampings (rows damping-major, ``k`` per damping): the averaged solutions, the
    averaged iterates after ``mid`` steps, the training points visited, per damping where it diverged (or None),
    and the rows' scales and dampings."""

    x: torch.Tensor
    half: torch.Tensor
    mid: int
    visited: torch.Tensor
    diverged: list[_Diverged | None]
    s: torch.Tensor
    lam: torch.Tensor
    #: seconds solving (a resumed solve's included; writing snapshots excluded)
    elapsed: float


@dataclass
class _State:
    """What a recursion has done so far (see :meth:`LiSSA._run`): the sum of the finished repeats' solutions and of
    their iterates at half depth, the points visited, per damping whether it is still iterating and where it
    diverged, and within a repeat its iterate ``x`` and last norms."""

    total: torch.Tensor
    half: torch.Tensor
    visited: torch.Tensor
    active: torch.Tensor
    diverged: list[_Diverged | None]
    x: torch.Tensor | None = None
    norms: list[torch.Tensor] = field(default_factory=list)

    def tensors(self, elapsed: float, monitor: Any) -> dict[str, torch.Tensor]:
        f64 = torch.float64
        out = {"total": self.total, "half": self.half, "visited": self.visited.to(torch.uint8),
               "active": self.active.to(torch.uint8), "elapsed": torch.tensor(elapsed, dtype=f64),
               "diverged_step": torch.tensor([0 if v is None else v.step for v in self.diverged]),
               "diverged_growth": torch.tensor([math.nan if v is None or v.growth is None else v.growth
                                                for v in self.diverged], dtype=f64)}
        if self.x is not None:
            out |= {"x": self.x, "norms": torch.stack(self.norms)}
        if hasattr(monitor, "state_dict"):
            out |= {f"monitor.{k}": v for k, v in monitor.state_dict().items()}
        return out

    def load(self, snapshot: tuple[int, dict[str, torch.Tensor]], monitor: Any) -> tuple[int, float]:
        """Restore from ``(steps done, tensors)`` (and the monitor's rows); returns the steps and seconds done."""
        done, t = snapshot
        self.total.copy_(t["total"])
        self.half.copy_(t["half"])
        self.visited.copy_(t["visited"].bool())
        self.active.copy_(t["active"].bool())
        self.diverged = [None if int(st) == 0 else _Diverged(int(st), None if math.isnan(g) else g)
                         for st, g in zip(t["diverged_step"].tolist(), t["diverged_growth"].tolist(), strict=True)]
        if "x" in t:
            self.x, self.norms = t["x"], [n.to(self.total.device) for n in t["norms"].unbind(0)]
        elapsed = float(t["elapsed"])
        if hasattr(monitor, "load_state_dict"):
            monitor.load_state_dict({k[8:]: v for k, v in t.items() if k.startswith("monitor.")})
        return done, elapsed


def _growth(norms: Sequence[torch.Tensor], rows: slice) -> float | None:
    """The per-step growth factor of the largest norm over the last finite steps of ``norms`` (a list of per-row
    norms, one per step), for the rows ``rows``; None when it did not grow or cannot be measured."""
    finite = [n[rows] for n in norms if bool(torch.isfinite(n[rows]).all())]
    if len(finite) < 2:
        return None
    g = float((finite[-1] / finite[0].clamp_min(1e-300)).max()) ** (1.0 / (len(finite) - 1))
    return g if math.isfinite(g) and g > 1.0 else None


def _round_up(x: float) -> float:
    """``x`` rounded up to two significant digits (5234 -> 5300, 0.0123 -> 0.013)."""
    if not (x > 0 and math.isfinite(x)):
        return x
    unit = 10.0 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(x / unit * (1 - 1e-12)) * unit

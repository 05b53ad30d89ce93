"""IHVP accuracy (paper Sec. 6.2): relative error and cosine of a solver's ``(G + λI)^-1 g_q`` for the query
gradients against a reference solver (CG with exact damped GGN/Hessian products at a tight tolerance), and wall
time, per damping value; with both solvers' relative residuals ``||(G + λI) x - v|| / ||v||`` where they are
iterative (:class:`~influencelab.solvers.base.Convergence`) and whether the reference converged (a direct
reference, e.g. ``exact``, counts as converged): an error against an unconverged reference is not a valid one."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import bootstrap

from ..api import Attributor
from ..engine import convergence_metrics
from ..errors import ConfigError, check
from ..metric_names import metric_name
from ..pipeline import Context
from ..progress import activity
from ..registry import report_plot, stage
from ..scores import query_gradients
from ..solvers.base import Convergence, needs_parameter_space, parse_dampings
from ..solvers.iterative import IterativeSolver

log = logging.getLogger("influencelab")


@dataclass
class IHVPConfig:
    """``reference``: the reference solver (a name of the ``solver`` group: ``gram`` is exact at every damping where
    ``n x classes`` is small; ``cg`` otherwise); ``reference_args``: its keys; ``scores``: see below."""

    reference: str = "cg"
    reference_args: dict[str, Any] = field(default_factory=dict)
    #: also score every training point against each query with the solver's and the reference's IHVP and record
    #: the per-query Spearman correlation (``ihvp/spearman*``): one pass of training gradients per damping
    scores: bool = True

    def __post_init__(self) -> None:
        from ..compose import solver_names

        check(self.reference in solver_names(), "ihvp.reference", self.reference,
              f"use one of {', '.join(solver_names())}")


def explicit_dampings(ctx: Context) -> None:
    """The comparison is at explicit dampings (``auto`` means a different λ for each solver), and the reference's
    config composes (its keys checked before anything is trained); both solvers' vectors are parameter-space
    gradients."""
    needs_parameter_space(ctx.new_solver(), "ihvp", "(G + λI)^-1 g on the parameters to compare with the reference")
    needs_parameter_space(ctx.new_solver(reference_node(ctx)), "ihvp (as ihvp.reference)",
                          "(G + λI)^-1 g on the parameters to compare with")
    if "auto" in parse_dampings(ctx.cfg.solver.get("damping", 1e-3)):
        raise ConfigError("solver.damping=auto is invalid for stage ihvp: compare at explicit values, "
                          "e.g. solver.damping=[1e-4,1e-3,1e-2]")


#: error levels at which the ihvp stage records an iterative solver's iterations and time to reach them
ERROR_LEVELS = (0.1, 0.01)
COLUMNS = ["solver", "damping", "rel_error", "cosine", "fit_s", "precondition_s", "time_s", "rel_residual",
           "ref_rel_residual", "ref_converged", "iterations", *(f"{w}_to_{e:g}" for e in ERROR_LEVELS
                                                                 for w in ("iters", "time_s"))]


class ErrorTrace:
    """Per iteration of an iterative solver (its
    :meth:`~influencelab.solvers.iterative.IterativeSolver.set_monitor` hook): the mean relative error of the current
    iterate against the reference, and the first iteration (and wall time since it began, solving only) at
    which it is at most each of :data:`ERROR_LEVELS`. Its rows and clock are part of a resumable solve's snapshot
    (:meth:`state_dict`, :meth:`load_state_dict`; :meth:`pause` excludes the snapshot's writing)."""

    def __init__(self, target: torch.Tensor):
        self.target, self.tnorm = target, target.norm(dim=1).clamp_min(1e-30)
        self.errors: list[float] = []
        self.iterations: list[int] = []  # the solver's iteration count at each record (steps in all, for LiSSA)
        self.times: list[float] = []  # solving time (s) when each error was reached
        self.reached: dict[float, tuple[int, float]] = {}
        self.t0 = time.perf_counter()
        self.paused = 0.0

    def elapsed(self) -> float:
        """Seconds solving since this trace began (its own time and paused time excluded; a resumed solve's
        seconds before its snapshot included)."""
        return time.perf_counter() - self.t0 - self.paused

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def __call__(self, damping: Any, iteration: int, x: torch.Tensor) -> None:
        t = time.perf_counter()
        err = ((x.to(self.target) - self.target).norm(dim=1) / self.tnorm).mean().item()
        self._record(int(iteration), t - self.t0 - self.paused, err)
        self.paused += time.perf_counter() - t  # (the trace's own time is not the solver's)

    def _record(self, iteration: int, seconds: float, err: float) -> None:
        self.errors.append(err)
        self.iterations.append(iteration)
        self.times.append(seconds)
        for e in ERROR_LEVELS:
            if err <= e and e not in self.reached:
                self.reached[e] = (iteration, seconds)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"iterations": torch.tensor(self.iterations, dtype=torch.int64),
                "times": torch.tensor(self.times, dtype=torch.float64),
                "errors": torch.tensor(self.errors, dtype=torch.float64),
                "elapsed": torch.tensor(self.elapsed(), dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The rows of a snapshot, and the clock set to its solving seconds (rows recorded since this trace began,
        by a search's attempts redone before the resumed one, are dropped: the snapshot has them)."""
        self.errors, self.iterations, self.times, self.reached = [], [], [], {}
        for i, t, e in zip(state["iterations"].tolist(), state["times"].tolist(), state["errors"].tolist(),
                           strict=True):
            self._record(int(i), float(t), float(e))
        self.t0 = time.perf_counter() - self.paused - float(state["elapsed"])


@stage("ihvp", section="ihvp", schema=IHVPConfig, precheck=explicit_dampings)
def ihvp_stage(ctx: Context) -> None:
    """Error and cosine against the reference per damping (metrics per damping and an ``ihvp`` table); for an
    iterative solver also its iterations, and the iterations and time (fit + solve) it took to reach an error of
    0.1 and 0.01 (NaN: not reached)."""
    attr = ctx.attributor
    solver = attr.solver
    queries = ctx.test_data.subset(ctx.query_positions)
    grads = query_gradients(solver, attr.model, queries, ctx.score.batch_size)
    ref = Reference(ctx)
    rows, metrics, per_query = [], {}, []
    nan = float("nan")
    scored = ctx.section("ihvp").scores
    trace_rows: list[list[Any]] = []  # an iterative solver's mean error after each iteration, and when
    for d in solver.dampings:
        target, ref_conv = reference_ihvp(ctx, ref, grads, float(d))
        solver.reset_diagnostics()
        trace = ErrorTrace(target)
        iterative = isinstance(solver, IterativeSolver)
        if iterative:
            solver.set_monitor(trace)
        try:
            x = solver.precondition(grads, d)
        finally:
            if iterative:
                solver.set_monitor(None)
        own = solver.diagnostics().get(d)
        trace_rows += [[solver.label, float(d), i, attr.fit_seconds + t, e]
                       for i, t, e in zip(trace.iterations, trace.times, trace.errors, strict=True)]
        # (solving, not measuring residuals or tracing errors)
        prec_s = trace.elapsed() - (own.measure_s if own else 0.0)
        errs, coss = vector_agreement(x, target)
        err, cos = errs.mean().item(), coss.mean().item()
        rhos = score_agreement(ctx, x, target) if scored else torch.full_like(errs, nan)
        per_query += [[solver.label, float(d), int(q), e, c, r] for q, e, c, r in
                      zip(ctx.query_positions.tolist(), errs.tolist(), coss.tolist(), rhos.tolist(), strict=True)]
        metrics.update(spread(errs.numpy(), "ihvp/rel_error", d) | spread(coss.numpy(), "ihvp/cosine", d))
        if scored:
            metrics.update(spread(rhos.numpy(), "ihvp/spearman", d))
            metrics[metric_name("ihvp/spearman", d)] = float(rhos.mean())
        total = attr.fit_seconds + prec_s
        ref_ok = ref_conv is None or ref_conv.converged
        reach = []
        for e in ERROR_LEVELS:
            if own is None:  # a direct solver: all or nothing
                reach += [0 if err <= e else nan, total if err <= e else nan]
            else:
                it, sec = trace.reached.get(e, (nan, nan))
                reach += [it, attr.fit_seconds + sec]
        rows.append([solver.label, float(d), err, cos, attr.fit_seconds, prec_s, total,
                     own.rel_residual_max if own else nan, ref_conv.rel_residual_max if ref_conv else nan, ref_ok,
                     own.iterations if own else 0, *reach])
        metrics.update({metric_name("ihvp/rel_error", d): err, metric_name("ihvp/cosine", d): cos,
                        metric_name("ihvp/time_s", d): total, metric_name("ihvp/ref_converged", d): ref_ok})
        metrics.update({metric_name(f"ihvp/{c}", d): v for c, v in zip(COLUMNS[-4:], reach)})
        if own is not None:
            metrics[metric_name("ihvp/rel_residual", d)] = own.rel_residual_max
            metrics[metric_name("ihvp/iterations", d)] = own.iterations
            # the rule that set the solve beside its result (LiSSA's scale search, depth and repeats; CG's floor)
            metrics.update(convergence_metrics({d: own}))
        if ref_conv is not None:
            metrics[metric_name("ihvp/ref_rel_residual", d)] = ref_conv.rel_residual_max
        if not ref_ok:
            log.warning("ihvp at damping %g: the reference %s did not converge (relative residual %.3g > %g), so "
                        "rel_error is not against a valid reference; raise ihvp.reference_args.%s", float(d),
                        ref.solver.name, ref_conv.rel_residual_max, ref_conv.tol, ref.solver.iteration_key)
    if len(rows) == 1:
        metrics.update({"ihvp/solver": solver.label, "ihvp/damping": rows[0][1], "ihvp/rel_error": rows[0][2],
                        "ihvp/cosine": rows[0][3], "ihvp/time_s": rows[0][6], "ihvp/ref_converged": rows[0][9]})
        for k in ("rel_residual", "ref_rel_residual", "iterations", *COLUMNS[-4:]):
            if metric_name(f"ihvp/{k}", rows[0][1]) in metrics:
                metrics[f"ihvp/{k}"] = metrics[metric_name(f"ihvp/{k}", rows[0][1])]
    ctx.tracker.log(metrics)
    ctx.tracker.table("ihvp", COLUMNS, rows)
    if trace_rows:  # (what a time-matched comparison reads: the error an iterative solver had at a given time)
        ctx.tracker.table("ihvp_trace", ["solver", "damping", "iteration", "time_s", "rel_error"], trace_rows)
    ctx.tracker.table("ihvp_queries", ["solver", "damping", "query", "rel_error", "cosine", "spearman"], per_query)


def vector_agreement(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, ``||x - t|| / ||t||`` and the cosine of ``x`` and ``t``, in float64, one row at a time (for a big
    model a ``[k, P]`` float64 copy is gigabytes, and torch's cosine_similarity makes several)."""
    errs, coss = [], []
    for xi, ti in zip(x, target, strict=True):
        xd, td = xi.double(), ti.double()
        tn = td.norm()
        errs.append(float((xd - td).norm() / tn.clamp_min(1e-30)))
        coss.append(float(xd @ td / (xd.norm() * tn).clamp_min(1e-300)))
    return torch.tensor(errs, dtype=torch.float64), torch.tensor(coss, dtype=torch.float64)


def score_agreement(ctx: Context, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per query, the Spearman correlation over the training set of the solver's pairwise scores ``x^T g_z`` with
    the reference's ``target^T g_z`` (``g_z``: the run solver's training gradients, in batches: what users see)."""
    from scipy.stats import spearmanr

    attr = ctx.attributor
    solver = attr.solver
    mine, ref = [], []
    # (a batch's per-example gradients are [b, P]: at most ~1 GB of them at a time, 22 examples on ResNet-18)
    batch = max(1, min(ctx.score.batch_size, int(2**30 // (x.shape[1] * x.element_size()))))
    for xb, yb, _ in ctx.train_data.batches(batch):
        g = solver.train_grads(attr.model, xb, yb)  # (in the solver's dtype: ranks need no float64 copy of x)
        mine.append((x @ g.to(x.dtype).T).double())
        ref.append((target.to(x.dtype) @ g.to(x.dtype).T).double())
    a, b = torch.cat(mine, 1).cpu().numpy(), torch.cat(ref, 1).cpu().numpy()
    return torch.tensor([spearmanr(a[q], b[q]).statistic for q in range(len(a))], dtype=torch.float64)


def spread(values: np.ndarray, name: str, damping: Any) -> dict[str, float]:
    """The spread over queries of a per-query value: ``<name>_min``, ``_max``, quartiles ``_q25`` / ``_median`` /
    ``_q75``, and a 95% percentile-bootstrap
    interval of its mean, ``_ci_low`` / ``_ci_high`` (resampling queries; seeded), each per damping."""
    q25, q50, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    out = {metric_name(f"{name}_min", damping): float(values.min()),
           metric_name(f"{name}_max", damping): float(values.max()),
           metric_name(f"{name}_q25", damping): float(q25), metric_name(f"{name}_median", damping): float(q50),
           metric_name(f"{name}_q75", damping): float(q75)}
    lo = hi = float(values.mean())
    if len(values) > 1 and np.ptp(values) > 0:
        ci = bootstrap((values,), np.mean, n_resamples=1000, confidence_level=0.95, method="percentile",
                       random_state=np.random.default_rng(0)).confidence_interval
        lo, hi = float(ci.low), float(ci.high)
    out[metric_name(f"{name}_ci_low", damping)], out[metric_name(f"{name}_ci_high", damping)] = lo, hi
    return out


def reference_node(ctx: Context):
    """The reference solver's config: the ``solver`` group's ``ihvp.reference`` with the run's seed, modules,
    dtype (the more precise of the run's and the reference's own) and curvature, then ``ihvp.reference_args``."""
    from ..compose import solver_node

    c = ctx.section("ihvp")
    keys = {"curvature": ctx.cfg.solver.get("curvature", "fisher")} if ctx.cfg.solver.get(
        "curvature", "fisher") in ("fisher", "empirical_fisher", "hessian") else {}
    if "dtype" not in c.reference_args and solver_node(c.reference).get("dtype") == "float64":
        keys["dtype"] = "float64"  # a float64 reference (gram, exact) stays float64 under a float32 run
    return ctx.solver_node(c.reference, **{**keys, **c.reference_args})  # (reference_args win: curvature too)


class Reference:
    """The stage's reference solver, fitted (or its cached fit loaded) only when a damping's reference IHVP is not in
    the cache: a sweep's later jobs read the cached solutions without loading ``gram``'s rows (gigabytes on
    ResNet-18) or fitting anything. ``fit_key``: the key its fit has (or will have) in the cache."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.solver = ctx.new_solver(reference_node(ctx))
        self.fit_key = ctx.artifacts.fit_key(self.solver, ctx.model_key)  # (fit_config needs no setup)
        self.attributor: Attributor | None = None

    def solve(self, grads: torch.Tensor, damping: float) -> tuple[torch.Tensor, Convergence | None]:
        if self.attributor is None:
            self.attributor = self.ctx.attributor_for(self.ctx.model, self.ctx.model_key, self.solver)
            assert self.attributor.fit_key == self.fit_key, "the reference's fit key changed by fitting"
        self.solver.reset_diagnostics()
        with activity(f"ihvp reference {self.solver.label} at damping {damping:g}"):  # named in the heartbeat
            out = self.solver.precondition(grads, damping)
        return out, self.solver.diagnostics().get(damping)


def reference_ihvp(ctx: Context, ref: Reference, grads: torch.Tensor, damping: float
                   ) -> tuple[torch.Tensor, Convergence | None]:
    """Reference ``(G + λI)^-1 g`` for the query gradients and its convergence (``None`` for a direct reference),
    cached per (model, queries, damping)."""
    solve = ref.solver.solve_config()  # (only where a solve has settings of its own: earlier keys unchanged)
    key = ctx.artifacts.key({"ref": ref.fit_key, "cfg": ref.solver.fit_config(), "damping": damping,
                             "queries": ctx.query_positions.tolist(), "model": ctx.model_key,
                             **({"solve": solve} if solve else {})})
    cache = ctx.artifacts.cache
    hit = cache.get("ihvp_reference", key) if cache is not None else None
    if hit is not None and "convergence" in hit[1]:  # (entries without it predate convergence records)
        conv = hit[1]["convergence"]
        return hit[0]["ihvp"].to(grads), None if conv is None else Convergence(**conv)
    out, conv = ref.solve(grads, damping)
    if cache is not None:
        cache.put("ihvp_reference", key, {"ihvp": out}, {"damping": damping},
                  {"convergence": None if conv is None else conv.as_dict()})
    return out, conv


@report_plot("ihvp")
def report_figure(root: Path, rows: list[dict[str, Any]], fig_dir: Path) -> list[Path]:
    """Relative error against damping and against wall time, one line per solver (``influencelab-report``);
    points whose reference did not converge (``ihvp/ref_converged`` false) are drawn hollow, and the legend says
    so."""
    import matplotlib

    from ..plots import HOLLOW, pyplot  # hollow means the same in every figure

    plt = pyplot()
    out: list[Path] = []
    axis_label, pts = error_points(rows)
    if pts:
        fig_dir.mkdir(exist_ok=True)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 3.5), layout="constrained")
        for solver in sorted({p[0] for p in pts}):
            sel = sorted((p for p in pts if p[0] == solver), key=lambda p: p[1])
            (line,) = a1.plot([p[1] for p in sel], [p[2] for p in sel], label=solver)
            for ax, xi in ((a1, 1), (a2, 3)):
                for valid in (True, False):
                    part = [p for p in sel if p[4] == valid]
                    if part:
                        ax.scatter([p[xi] for p in part], [p[2] for p in part], edgecolors=line.get_color(),
                                   facecolors=line.get_color() if valid else "none", zorder=3)
        if any(not p[4] for p in pts):
            a1.scatter([], [], edgecolors="gray", facecolors="none", label=HOLLOW)
        a1.set(xscale="log", yscale="log", xlabel=axis_label, ylabel="relative error vs CG",
               title=f"error vs {axis_label.split()[0]}")
        a2.set(xscale="log", yscale="log", xlabel="wall time (s)", ylabel="relative error", title="error vs time")
        # minor labels overlap on short log ranges: none on x, short ones on y (errors often span < a decade)
        for axis in (a1.xaxis, a2.xaxis):
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        errors = [p[2] for p in pts if p[2] > 0]
        if errors and max(errors) < 10 * min(errors):  # (over more than a decade they would overlap)
            for axis in (a1.yaxis, a2.yaxis):
                axis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        if axis_label != "damping λ":  # a swept key (depth, ...): its values as the ticks
            xs = sorted({p[1] for p in pts})
            a1.set_xticks(xs, [f"{x:g}" for x in xs])
        fig.legend(*a1.get_legend_handles_labels(), loc="outside right center")
        fig.get_layout_engine().set(w_pad=0.05)
        out.append(fig_dir / "ihvp_error.png")
        fig.savefig(out[-1], dpi=120)
        plt.close(fig)
    return out


def error_points(rows: list[dict[str, Any]]) -> tuple[str, list[tuple[str, float, float, Any, bool]]]:
    """The x axis and the points ``(series, x, relative error, time, reference valid)`` of the error plot."""
    import pandas as pd

    from ..plots import labels
    from ..sweeps import split_dampings

    # one point per job and damping (a damping list's too: the rows' long form, as load_sweep's), one line per
    # solver and per other swept key (curvature, modules); a sweep at one damping over another numeric key
    # (solver.depth, ...) has that key as the x axis instead of the damping
    long = split_dampings(pd.DataFrame(rows), first="solver.damping" if any("solver.damping" in r for r in rows)
                          else None)
    ok = [{k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))}
          for r in long.to_dict("records") if pd.notna(r.get("ihvp/rel_error"))]
    for r in ok:  # the damping solved at: the row's own (a list's), else the resolved one ("auto")
        own = _number(r.get("damping"))
        r["_damping"] = own if own is not None else _number(r.get("ihvp/damping"))
    ok = [r for r in ok if r["_damping"] is not None]
    axis, axis_label = "_damping", "damping λ"
    swept = [k for k in dict.fromkeys(k for r in ok for k in r) if "/" not in k and not k.startswith("_")
             and k not in ("job", "solver", "solver.damping", "damping") and len({str(r.get(k)) for r in ok}) > 1]
    if len({r["_damping"] for r in ok}) == 1 and len(swept) == 1 and all(
            _number(r.get(swept[0])) is not None for r in ok):
        axis, axis_label = swept[0], swept[0]
    series = labels(ok, exclude=(axis, "_damping", "damping", "solver", "solver.damping"), same="")
    pts = [(", ".join(x for x in (r.get("ihvp/solver", r.get("solver", "?")), name) if x), _number(r[axis]),
            r["ihvp/rel_error"], r.get("ihvp/time_s"),
            r.get("ihvp/ref_converged", True) not in (False, "False", "false", 0))
           for r, name in zip(ok, series, strict=True)]
    return axis_label, pts


def _number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

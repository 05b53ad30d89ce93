"""Choosing the damping λ (and the tracked layers) with only what a user has (issue 27): their training data with
its possibly noisy labels, splits carved from it, and retraining budgets they choose. The flip mask
(``LabeledData.flipped``, ``clean_targets``) and the test set are never read.

Objectives (``select.objective``):

* ``injected_flips`` (for mislabel detection): inject ``n_inject`` extra label flips into the user's own training
  data (points drawn uniformly from all points, each moved to another class), retrain the same model on it, score
  self-influence at every candidate (λ, module set), and keep the candidate whose ranking puts the injected flips
  highest (recall of the injected flips in the top ``fraction`` of the data, the fraction a user would inspect;
  ties broken by their ROC AUC against every other point, then by the larger λ). The flips the data already has,
  unknown to the user, are simply part of it. :func:`select_by_injected_flips`.
* ``lds_holdout`` (for attribution): hold out ``n_queries`` training points as queries, retrain on ``n_subsets``
  random subsets of the rest, and keep the λ with the best mean LDS on those queries. :func:`select_by_lds_holdout`.
* ``spectrum``: kronfluence's rule, λ = 0.1 x the mean eigenvalue of the curvature (``solver.damping=auto``), on the
  configured layers: the baseline the others have to beat.

The stage logs the choice (``select/damping``, ``select/modules``, ``select/lambda``) and the evidence
(``select/score@<λ>/<modules>`` and the objective's other statistics per candidate), writes ``select.csv``, and
hands the choice to the stages that follow in the same run (:meth:`~influencelab.pipeline.Context.use_solver`):
``stages=[train,select,self,mislabel]`` scores with the selected λ and layers.

The injected-flip calibration also estimates how many labels the data has flipped (:func:`estimate_n_flipped`,
logged as ``select/n_flipped_estimate``; ``unlearn.size=auto`` uses it through :func:`estimated_flip_count`).
"""

from __future__ import annotations

import csv
import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict
from sklearn.metrics import roc_auc_score
from torch import nn

from .. import distributed
from ..api import Attributor
from ..artifacts import digest
from ..cache import atomic_write_bytes
from ..compose import plain
from ..data.base import LabeledData, as_labeled
from ..errors import ConfigError, check
from ..evaluation import recall_at
from ..metric_names import damping_label, metric_name
from ..pipeline import Context
from ..registry import report_plot, stage
from ..schema import typed
from ..solvers.base import Damping, Solver, parse_dampings
from ..solvers.layout import ParamLayout
from ..train import per_example_loss
from .lds import lds_per_query, subset_masks, summarize
from .retraining import retrained_measurements, retrained_model

log = logging.getLogger("influencelab")

OBJECTIVES = ("injected_flips", "lds_holdout", "spectrum")
#: ``select.metric`` of ``injected_flips``: what ranks the candidates first (the other breaks ties)
METRICS = ("recall", "auc")
#: the default candidate grid: eight decades around the values that won in experiments/RESULTS.md (1e-8 once labels
#: are memorised, 1 before; 1e-4 to 1e-3 for LDS), and kronfluence's rule
DEFAULT_DAMPINGS: list[Damping] = [1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, "auto"]
#: stages that may run before ``select`` (they do not use the solver's scores)
BEFORE_SELECT = ("train", "fit")


@dataclass
class SelectConfig:
    """How the damping (and the tracked layers) are chosen; see the module docstring.

    ``objective``: ``injected_flips`` | ``lds_holdout`` | ``spectrum``. ``dampings``: the candidate λ (numbers and
    ``auto``), every one scored in one pass per module set. ``modules``: the candidate module sets (``all``,
    ``last:K``, ``re:PATTERN``), or null for the solver's own ``solver.modules``; ``spectrum`` always keeps the
    solver's. ``injected_flips``: ``n_inject`` flips (a fraction of the training set when < 1, else a count),
    ``repeats`` independent injections (each one more training run; scores averaged), candidates ranked by
    ``metric`` (``recall`` of the injected flips in the top ``fraction`` of the data, or their ROC ``auc``).
    ``lds_holdout``: ``n_queries`` training points held out as queries, ``n_subsets`` retrainings on random subsets
    of ``subset_fraction`` of the rest. ``seed``: of the injections / the held-out split (null: the run's ``seed``).
    The calibration models are single models (``score.ensemble`` applies to the stages after ``select``).
    """

    objective: str = "injected_flips"
    dampings: list[Any] = field(default_factory=lambda: list(DEFAULT_DAMPINGS))
    modules: list[str] | None = field(default_factory=lambda: ["all", "last:1"])
    metric: str = "recall"
    fraction: float = 0.1
    n_inject: float = 0.02
    repeats: int = 1
    n_queries: int = 32
    n_subsets: int = 20
    subset_fraction: float = 0.5
    seed: int | None = None

    def __post_init__(self) -> None:
        check(self.objective in OBJECTIVES, "select.objective", self.objective, f"use one of {', '.join(OBJECTIVES)}")
        try:
            parse_dampings(self.dampings)
        except ConfigError:
            raise ConfigError(f"select.dampings={self.dampings!r} is invalid: give a list of numbers >= 0 and/or "
                              f"auto, e.g. [1e-8,1e-4,1e-2,1,auto]") from None
        check(self.modules is None or len(self.modules) >= 1, "select.modules", self.modules,
              "give at least one module set (all, last:K, re:PATTERN), or null for solver.modules")
        check(self.metric in METRICS, "select.metric", self.metric, f"use one of {', '.join(METRICS)}")
        check(0 < self.fraction < 1, "select.fraction", self.fraction, "must be in (0, 1): the fraction inspected")
        check(self.n_inject > 0 and (self.n_inject < 1 or float(self.n_inject).is_integer()), "select.n_inject",
              self.n_inject, "must be a fraction in (0, 1) of the training set or a whole number of points >= 1")
        check(self.repeats >= 1, "select.repeats", self.repeats, "must be an integer >= 1")
        check(self.n_queries >= 2, "select.n_queries", self.n_queries, "must be an integer >= 2")
        check(self.n_subsets >= 2, "select.n_subsets", self.n_subsets, "must be an integer >= 2")
        check(0 < self.subset_fraction < 1, "select.subset_fraction", self.subset_fraction, "must be in (0, 1)")


# -- the result -----------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One (λ, module set) and how it did: ``score`` (higher is better; the objective), ``lam`` (λ as a number on
    the calibration model: ``auto`` resolved, averaged over repeats) and the objective's other statistics."""

    damping: Damping
    modules: str
    lam: float
    score: float
    evidence: dict[str, float] = field(default_factory=dict)
    #: what breaks a tie in ``score`` before the larger λ does (``injected_flips``: the other metric)
    tiebreak: float = 0.0

    @property
    def label(self) -> str:
        return f"{damping_label(self.damping)}/{self.modules}"


@dataclass
class Selection:
    """The chosen ``damping`` and ``modules`` of an ``objective``, with every candidate's evidence. For
    ``injected_flips``, ``calibration`` holds per repeat the self-influence at the chosen candidate of the
    calibration data (the user's data plus the injections) and the injected mask: what
    :func:`estimate_n_flipped` reads."""

    objective: str
    damping: Damping
    modules: str
    candidates: list[Candidate] = field(default_factory=list)
    calibration: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def n_flipped_estimate(self) -> float | None:
        """How many labels of the user's data are flipped (mean over repeats; :func:`estimate_n_flipped`), or
        ``None`` without an injected-flip calibration."""
        if not self.calibration:
            return None
        return float(np.mean([estimate_n_flipped(s, inj) for s, inj in self.calibration]))


def choose(candidates: Sequence[Candidate]) -> Candidate:
    """The best candidate: the highest ``score``; among equal scores the highest ``tiebreak``, then the larger λ
    (a larger damping is the more conservative, better-conditioned choice); then the first listed."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    def key(c: Candidate) -> tuple[float, float, float]:
        return (_finite(c.score), _finite(c.tiebreak), _finite(c.lam))
    best = candidates[0]
    for c in candidates[1:]:
        if key(c) > key(best):
            best = c
    return best


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("-inf")


# -- the user's data, relabelled -----------------------------------------------------------------------------
def inject_flips(targets: torch.Tensor, k: int, num_classes: int, seed: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, new_targets)``: ``k`` positions drawn uniformly without replacement from all of ``targets``
    (seeded), each moved to a uniformly drawn *other* class than its given label (the noise model of
    ``dataset.label_noise``). Nothing but the given labels is read."""
    n = len(targets)
    check(1 <= k < n, "select.n_inject", k, f"must give between 1 and {n - 1} points to flip")
    check(num_classes >= 2, "select.objective", "injected_flips", "needs at least 2 classes to flip labels between")
    rng = np.random.default_rng(seed)
    pos = torch.as_tensor(np.sort(rng.choice(n, size=k, replace=False)))
    shift = torch.as_tensor(rng.integers(1, num_classes, size=k))
    new = targets.clone()
    new[pos] = (targets[pos] + shift) % num_classes
    return pos, new


def as_given(data: LabeledData, targets: torch.Tensor | None = None,
             positions: torch.Tensor | None = None) -> LabeledData:
    """``data`` as its user sees it: ``targets`` (default: its given labels) are its only labels (also as
    ``clean_targets``, so its flip mask marks nothing but what a caller changes), optionally restricted to
    ``positions``. Its own ``clean_targets`` and flip mask are not read."""
    y = data.targets if targets is None else targets
    if positions is None:
        return LabeledData(data.x, y, data.targets, data.indices, data.num_classes, data.classes)
    idx = torch.as_tensor(positions, dtype=torch.long)
    x = data.x[idx] if data.in_memory else torch.utils.data.Subset(data.x, idx.tolist())
    return LabeledData(x, y[idx], data.targets[idx], data.indices[idx], data.num_classes, data.classes)


def n_injected(n_inject: float, n: int) -> int:
    """``n_inject`` as a number of points of a training set of ``n``: a fraction when < 1, else a count."""
    k = int(round(n_inject * n)) if n_inject < 1 else int(n_inject)
    return max(1, min(k, n - 1))


# -- objectives, as plain functions (the stage below and Python users call them) -------------------------------
TrainFn = Callable[[LabeledData], nn.Module]
AttributorFactory = Callable[[nn.Module, LabeledData, str], Attributor]


def select_by_injected_flips(train_fn: TrainFn, train_data: Any, attributor_factory: AttributorFactory,
                             dampings: Sequence[Damping] = tuple(DEFAULT_DAMPINGS),
                             modules: Sequence[str] = ("all", "last:1"), n_inject: float = 0.02,
                             fraction: float = 0.1, metric: str = "recall", repeats: int = 1,
                             seed: int = 0) -> Selection:
    """Pick (λ, module set) for mislabel detection by how well self-influence finds label flips the user injects.

    For each of ``repeats`` injections: ``n_inject`` points (a fraction of the data when < 1, else a count) drawn
    uniformly from all of ``train_data`` get another class than their given label; ``train_fn(data)`` trains a
    fresh model on the result (the user's own recipe, from scratch); for each module set,
    ``attributor_factory(model, data, modules)`` returns an :class:`~influencelab.api.Attributor` fitted on that
    data, and one self-influence pass scores every damping. A candidate's score is the recall of the injected flips
    in the top ``fraction`` of the data (``metric="recall"``; the fraction a user inspects) or their ROC AUC
    against every other point (``metric="auc"``), averaged over the repeats; ties go to the other of the two, then
    to the larger λ.

    Only the given labels are read: not ``train_data.flipped`` nor ``clean_targets``; any flips the data already
    has are part of it (they rank high too, and only lower every candidate's score alike).

    Why recall in the top ``fraction`` by default: it is the quantity a user acts on (how many flips an inspection
    of that budget finds), and the injected flips follow the same noise model as uniform label noise, so it
    estimates that recall; the AUC, which uses the whole ranking, is less noisy with few injected points and
    breaks its ties.

    Example::

        from influencelab import Attributor
        from influencelab.stages.select import select_by_injected_flips

        def train_fn(data):                      # your training recipe, from scratch, on (x, y) data
            model = make_model()
            fit(model, data)
            return model

        def factory(model, data, modules):       # the solver you will score with
            return Attributor(model, solver="ekfac", modules=modules).fit(data)

        sel = select_by_injected_flips(train_fn, train, factory, dampings=[1e-8, 1e-4, 1e-2, 1, "auto"])
        scores = factory(my_model, train, sel.modules).self_influence(dampings=[sel.damping])[0]
        n_fix = round(sel.n_flipped_estimate())  # how many of the top-ranked to inspect or fix

    Returns a :class:`Selection` (``damping``, ``modules``, ``candidates`` with their evidence, ``calibration``).
    """
    check(metric in METRICS, "select.metric", metric, f"use one of {', '.join(METRICS)}")
    data = as_labeled(train_data)
    dampings = parse_dampings(list(dampings))
    modules = list(modules)
    n = len(data)
    k = n_injected(n_inject, n)
    # per (modules, damping): a list over repeats of (recall, auc, λ); per (repeat, modules): the scores
    stats: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    scores: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for r in range(repeats):
        pos, targets = inject_flips(data.targets, k, data.num_classes, (int(seed), 27, r))
        injected = torch.zeros(n, dtype=torch.bool)
        injected[pos] = True
        calib = as_given(data, targets)
        log.info("select: %d injected label flips (repeat %d/%d), training the calibration model", k, r + 1, repeats)
        model = train_fn(calib)
        for mi, m in enumerate(modules):
            attr = attributor_factory(model, calib, m)
            s = attr.self_influence(dampings=dampings)
            if s is None:
                raise ConfigError("select cannot run as a score.partition job: run it without score.partition")
            s = s.detach().double().cpu()
            scores[r, mi] = (s, injected)
            for di, d in enumerate(dampings):
                lam = attr.solver.resolve_damping(d)
                si, inj = s[di].numpy(), injected.numpy()
                if not np.isfinite(si).all():  # e.g. λ = 0 on a singular curvature: never chosen
                    stats.setdefault((mi, di), []).append((float("nan"), float("nan"), lam))
                    continue
                stats.setdefault((mi, di), []).append(
                    (recall_at(si, inj, fraction), float(roc_auc_score(inj, si)), lam))
    pct = f"{100 * fraction:g}"
    candidates = []
    for (mi, di), rows in stats.items():
        recall, auc, lam = (float(np.mean(v)) for v in zip(*rows, strict=True))
        score, tie = (recall, auc) if metric == "recall" else (auc, recall)
        candidates.append(Candidate(dampings[di], modules[mi], lam, score,
                                    {f"injected_recall_at_{pct}": recall, "injected_auc": auc}, tie))
    best = choose(candidates)
    mi, di = modules.index(best.modules), dampings.index(best.damping)
    calibration = [(scores[r, mi][0][di].float(), scores[r, mi][1]) for r in range(repeats)]
    return Selection("injected_flips", best.damping, best.modules, candidates, calibration)


def select_by_lds_holdout(train_fn: TrainFn, train_data: Any, attributor_factory: AttributorFactory,
                          dampings: Sequence[Damping] = tuple(DEFAULT_DAMPINGS), modules: Sequence[str] = ("all",),
                          n_queries: int = 32, n_subsets: int = 20, fraction: float = 0.5, seed: int = 0,
                          retrain_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                          n_bootstrap: int = 1000) -> Selection:
    """Pick (λ, module set) for attribution by the LDS on queries held out of the *training* data.

    ``n_queries`` training points (seeded) become queries; the rest, R, is what the model is trained on
    (``train_fn``) and the attributor fitted on (``attributor_factory(model, R, modules)``). The ground truth is the
    queries' loss after retraining on ``n_subsets`` random subsets of ``fraction`` of R: ``retrain_loss(positions,
    query_positions)`` (positions in ``train_data``; default: ``train_fn`` on those points, then the loss of each
    query under its given label). A candidate's score is the mean over queries of the Spearman correlation between
    the predicted (sum of its scores over a subset) and the actual query loss across subsets (the LDS, as the
    ``lds`` stage computes it); ties go to the larger λ. The test set is not read.

    Example::

        sel = select_by_lds_holdout(train_fn, train, factory, dampings=[1e-5, 1e-4, 1e-3, 1e-2, "auto"],
                                    n_subsets=20)
        sel.damping, [(c.label, c.score) for c in sel.candidates]
    """
    data = as_labeled(train_data)
    dampings = parse_dampings(list(dampings))
    modules = list(modules)
    n = len(data)
    check(2 <= n_queries <= n // 2, "select.n_queries", n_queries, f"must be in [2, {n // 2}] (half the training set)")
    perm = torch.as_tensor(np.random.default_rng((int(seed), 28)).permutation(n))
    qpos, rest = perm[:n_queries].sort().values, perm[n_queries:].sort().values
    queries = as_given(data, positions=qpos)
    base = as_given(data, positions=rest)
    if retrain_loss is None:
        def retrain_loss(positions: torch.Tensor, _q: torch.Tensor) -> torch.Tensor:
            return per_example_loss(train_fn(as_given(data, positions=positions)), queries).double()
    masks = subset_masks(len(rest), n_subsets, fraction, int(seed))
    log.info("select: LDS on %d held-out training points, %d retrainings", n_queries, n_subsets)
    truth = torch.stack([retrain_loss(rest[masks[i]], qpos).double().cpu() for i in range(n_subsets)])
    model = train_fn(base)
    candidates = []
    for m in modules:
        attr = attributor_factory(model, base, m)
        s = attr.pairwise(queries, dampings=dampings)
        if s is None:
            raise ConfigError("select cannot run as a score.partition job: run it without score.partition")
        s = s.detach().double().cpu()
        for di, d in enumerate(dampings):
            per_query = lds_per_query(s[di] @ masks.double().T, -truth.T, dropna=False)
            st = summarize(per_query, n_bootstrap, int(seed))
            candidates.append(Candidate(d, m, attr.solver.resolve_damping(d), st["mean"],
                                        {"lds_ci_low": st["ci_low"], "lds_ci_high": st["ci_high"],
                                         "lds_n": st["n"]}))
    best = choose(candidates)
    return Selection("lds_holdout", best.damping, best.modules, candidates)


def estimate_n_flipped(scores: Any, injected: Any, levels: Sequence[float] = (0.5,)) -> float:
    """How many points *besides the injected ones* have flipped labels, from one injected-flip calibration:
    ``scores`` (higher = more suspicious, e.g. self-influence) of every point of the calibration data and
    ``injected`` (mask of the k points flipped on purpose).

    At the threshold where a share r of the injected flips ranks at or above it, n_top points do; if the other
    flips rank like the injected ones, a share r of them is above it too, so the non-injected points above it,
    ``n_top - r k``, are ``r m (1 - k/n)`` flips plus the clean points that score as high. Hence
    ``m <= (n_top - r k) / (r (1 - k/n))``, with equality when no clean point ranks that high. The estimate is the
    smallest of these bounds over the ``levels`` r (a mixture-proportion estimate; the ``1 - k/n`` counts the
    injections that landed on already-flipped points). The default, the injected flips' median (r = 1/2), is a
    compromise: a higher level lets more clean points above the threshold (an overestimate), a lower one rests on
    fewer injected points, and the minimum over several noisy bounds is biased low when k is small (digits: k =
    29). With many injected points (k in the hundreds) several levels, e.g. ``(0.25, 0.5)``, tighten the bound.

    Assumptions (where they fail, the estimate is off in the stated direction):

    * the data's flips are like the injected ones: points anywhere, moved to a uniformly drawn other class. Noise
      concentrated on confusable classes ranks lower than random flips: underestimated;
    * few clean points rank above the injected flips at the levels used: with a weak ranking (e.g. a model that has
      memorised its labels) clean points above the threshold are counted as flips: overestimated;
    * the calibration model (trained with the injections) ranks like the user's model, and k is large enough that
      the injected quantiles are stable (on digits, 2% is k = 29 points: a noisy quantile; raise ``n_inject`` or
      ``repeats`` there).
    """
    s = np.asarray(scores, dtype=np.float64)
    inj = np.asarray(injected, dtype=bool)
    n, k = len(s), int(inj.sum())
    check(0 < k < n, "injected", k, f"needs between 1 and {n - 1} injected points")
    top = np.sort(s[inj])[::-1]  # the injected scores, highest first
    bounds = []
    for r in levels:
        j = max(1, math.ceil(r * k))
        n_top = int((s >= top[j - 1]).sum())  # points at or above the j-th highest injected score
        bounds.append((n_top - j) * k / j / (1 - k / n))
    return max(0.0, float(min(bounds)))


# -- the stage -------------------------------------------------------------------------------------------------
#: per run (Context): its selection, for later stages of the same run (``unlearn.size=auto``)
_SELECTIONS: weakref.WeakKeyDictionary[Context, Selection] = weakref.WeakKeyDictionary()


def _solver_modules(ctx: Context) -> Any:
    return plain(ctx.cfg.solver.get("modules", "all"))


def _solver_node(ctx: Context, **keys: Any) -> Any:
    """The run's solver config (resolved) with ``keys`` replaced."""
    return OmegaConf.merge(OmegaConf.create(plain(ctx.cfg.solver)), keys)


def _candidate_modules(ctx: Context, c: SelectConfig) -> list[Any]:
    return list(c.modules) if c.modules is not None else [_solver_modules(ctx)]


def check_select(ctx: Context) -> None:
    """Before any data is read: ``select`` comes before the stages that score; every candidate solver builds
    and its module sets resolve on the model; ``auto`` is resolvable by the solver; the objective fits the
    task and dataset."""
    c = ctx.section("select")
    stages = list(ctx.cfg.stages)
    early = [s for s in stages[: stages.index("select")] if s not in BEFORE_SELECT]
    if early:
        raise ConfigError(f"stages={stages} is invalid: select must come before {early}, which would score with "
                          f"the unselected solver; put select right after train")
    task = getattr(ctx, "task", None)
    if c.objective == "injected_flips" and ((task is not None and not task.has_classes)
                                            or ctx.dataset_spec.num_classes < 2):
        raise ConfigError("select.objective=injected_flips is invalid for this task: it flips class labels; use "
                          "select.objective=lds_holdout or spectrum")
    modules = _candidate_modules(ctx, c) if c.objective != "spectrum" else [_solver_modules(ctx)]
    dampings = parse_dampings(c.dampings) if c.objective != "spectrum" else ["auto"]
    for m in modules:
        try:  # a bad module set is a one-line error now, not after training
            ParamLayout(ctx.initial_model, m)
        except ConfigError as e:
            key = "select.modules" if c.modules is not None and c.objective != "spectrum" else "solver.modules"
            raise ConfigError(str(e).replace("solver.modules", key, 1)) from None
        solver = ctx.new_solver(_solver_node(ctx, modules=m, damping=dampings))
        if "auto" in dampings and type(solver).mean_eigenvalue is Solver.mean_eigenvalue:
            what = "select.dampings" if c.objective != "spectrum" else "select.objective=spectrum"
            raise ConfigError(f"{what} needs damping=auto, which solver {solver.name} cannot resolve (no curvature "
                              f"spectrum); remove auto or use another solver")
    check(ctx.score.partition is None, "score.partition", ctx.score.partition,
          "stage select scores its candidates in one job: run it without score.partition")
    if c.objective == "lds_holdout" and ctx.dataset_spec.subset is not None:
        check(c.n_queries <= ctx.dataset_spec.subset // 2, "select.n_queries", c.n_queries,
              f"must be at most half of dataset.subset={ctx.dataset_spec.subset}")


def _train_fn(ctx: Context, tag: str) -> TrainFn:
    """The run's model and trainer config trained from scratch on the given data (same seed as the run's model),
    cached by the data's labels and positions."""
    def train(data: LabeledData) -> nn.Module:
        key = {"select": tag, "targets": digest(data.targets), "indices": digest(data.indices)}
        return retrained_model(ctx, data, int(ctx.trainer.seed), key, "select_models")
    return train


def _factory(ctx: Context, dampings: list[Damping]) -> AttributorFactory:
    """The run's solver with the module set ``modules`` and the candidate dampings, fitted (cached) on the data."""
    def factory(model: nn.Module, data: LabeledData, modules: str) -> Attributor:
        solver = ctx.new_solver(_solver_node(ctx, modules=modules, damping=dampings))
        attr = Attributor(model, solver=solver, cache_dir=ctx.artifacts, score_batch_size=ctx.score.batch_size,
                          chunk_size=ctx.score.chunk_size)
        return attr.fit(data)
    return factory


@stage("select", section="select", schema=SelectConfig, precheck=check_select)
def select_stage(ctx: Context) -> None:
    """Choose λ (and the module set) with ``select.objective``; log the choice and the evidence, write
    ``select.csv``, and make the stages that follow use the choice."""
    c = ctx.section("select")
    seed = int(ctx.cfg.seed) if c.seed is None else int(c.seed)
    t0 = time.perf_counter()
    if c.objective == "spectrum":
        sel = Selection("spectrum", "auto", _solver_modules(ctx))
    else:
        dampings = parse_dampings(c.dampings)
        modules = _candidate_modules(ctx, c)
        if c.objective == "injected_flips":
            sel = select_by_injected_flips(_train_fn(ctx, "injected_flips"), ctx.train_data,
                                           _factory(ctx, dampings), dampings, modules, c.n_inject, c.fraction,
                                           c.metric, c.repeats, seed)
        else:
            train = ctx.train_data  # queries come from it: the test set is not the user's to tune on

            def retrain_loss(positions: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
                meas = retrained_measurements(ctx, positions, int(ctx.trainer.seed) + 1, train.images(qpos),
                                              train.targets[qpos], "select_lds")
                return meas["loss"]

            sel = select_by_lds_holdout(_train_fn(ctx, "lds_holdout"), train, _factory(ctx, dampings), dampings,
                                        modules, c.n_queries, c.n_subsets, c.subset_fraction, seed, retrain_loss)
    select_s = time.perf_counter() - t0
    log.info("select (%s): damping=%s, modules=%s", sel.objective, damping_label(sel.damping), sel.modules)
    ctx.use_solver(damping=sel.damping, modules=sel.modules)
    record_choice(ctx.run_dir, sel.damping, sel.modules)
    _SELECTIONS[ctx] = sel
    metrics: dict[str, Any] = {"select/objective": sel.objective, "select/damping": sel.damping,
                               "select/modules": str(sel.modules), "time/select_s": select_s}
    if sel.candidates:
        chosen = next(x for x in sel.candidates if x.damping == sel.damping and x.modules == sel.modules)
        metrics.update({"select/lambda": chosen.lam, "select/score": chosen.score,
                        "select/n_candidates": len(sel.candidates)})
        for x in sel.candidates:
            metrics[metric_name("select/score", x.damping, str(x.modules))] = x.score
            metrics.update({metric_name(f"select/{k}", x.damping, str(x.modules)): v for k, v in x.evidence.items()})
    else:  # spectrum: λ of the rule on the run's own model (fits the solver the later stages use)
        metrics["select/lambda"] = ctx.solver.resolve_damping("auto")
    estimate = sel.n_flipped_estimate()
    if estimate is not None:
        metrics["select/n_flipped_estimate"] = estimate
    ctx.tracker.log(metrics)
    keys = sorted({k for x in sel.candidates for k in x.evidence})
    rows = [[sel.objective, damping_label(x.damping), x.modules, x.lam, x.score,
             *(x.evidence.get(k, float("nan")) for k in keys),
             int(x.damping == sel.damping and x.modules == sel.modules)] for x in sel.candidates]
    if not rows:
        rows = [[sel.objective, damping_label(sel.damping), sel.modules, metrics["select/lambda"], float("nan"), 1]]
    ctx.tracker.table("select", ["objective", "damping", "modules", "lambda", "score", *keys, "chosen"], rows)


def record_choice(run_dir: Path, damping: Damping, modules: Any) -> None:
    """Write the chosen ``solver.damping`` and ``solver.modules`` into the run's ``.hydra/config.yaml`` (when it
    has one), so that the run's config says what its scores were computed with: ``load_run(...).attributor()``
    reproduces them and ``load_sweep`` puts the run's metrics at the chosen damping. What was typed stays in
    ``.hydra/overrides.yaml``."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.exists() or not distributed.is_main():
        return
    saved = OmegaConf.load(path)
    if "solver" not in saved:
        return
    with open_dict(saved):
        saved.solver.damping = damping
        saved.solver.modules = modules
    atomic_write_bytes(path, OmegaConf.to_yaml(saved).encode())
    log.info("select: the run's .hydra/config.yaml now records solver.damping=%s, solver.modules=%s",
             damping_label(damping), modules)


def estimated_flip_count(ctx: Context) -> int:
    """``unlearn.size=auto``: the number of flipped labels in the run's training data, estimated without the flip
    mask (:func:`estimate_n_flipped`) from the ``select`` stage's injected-flip calibration of this run, or, when
    the run has none, from one calibration at the solver's first damping and module set (its model is cached).
    Logged as ``select/n_flipped_estimate``; an integer in [1, n - 1]."""
    sel = _SELECTIONS.get(ctx)
    if sel is None or not sel.calibration:
        c = ctx.sections.get("select") or typed(ctx.cfg.get("select", {}), "select", SelectConfig)
        seed = int(ctx.cfg.seed) if c.seed is None else int(c.seed)
        d = ctx.new_solver().dampings[:1]
        sel = select_by_injected_flips(_train_fn(ctx, "injected_flips"), ctx.train_data, _factory(ctx, d), d,
                                       [_solver_modules(ctx)], c.n_inject, c.fraction, c.metric, c.repeats, seed)
    estimate = sel.n_flipped_estimate()
    assert estimate is not None
    n = len(ctx.train_data)
    size = int(min(max(round(estimate), 1), n - 1))
    ctx.tracker.log({"select/n_flipped_estimate": estimate})
    log.info("unlearn.size=auto: %d points (estimated flipped labels: %.1f of %d)", size, estimate, n)
    return size


@report_plot("select")
def report_figure(root: Path, rows: list[dict[str, Any]], fig_dir: Path) -> list[Path]:
    """Each job's objective against λ, one line per module set, the chosen candidate ringed
    (``influencelab-report``)."""
    from ..plots import labels, pyplot

    tables = []
    for r, name in zip(rows, labels(rows), strict=True):
        path = root / str(r["job"]) / "select.csv"
        if path.exists():
            with open(path) as f:
                data = [d for d in csv.DictReader(f) if d["score"] not in ("", "nan")]
            if data:
                tables.append((name, data))
    if not tables:
        return []
    plt = pyplot()
    fig_dir.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, data in tables:
        for m in dict.fromkeys(d["modules"] for d in data):
            pts = sorted(((float(d["lambda"]), float(d["score"]), d["chosen"] == "1", d["damping"]) for d in data
                          if d["modules"] == m), key=lambda p: p[0])
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", markersize=3,
                            label=f"{name}, {m}" if len(tables) > 1 else m)
            for lam, score, chosen, damping in pts:
                if chosen:
                    ax.plot([lam], [score], "o", markersize=10, mfc="none", color=line.get_color())
                if damping == "auto":  # kronfluence's rule, at the λ it resolved to
                    ax.annotate("auto", (lam, score), fontsize=6, xytext=(2, -8), textcoords="offset points")
    ax.set(xscale="log", xlabel="damping λ (auto resolved)", ylabel="selection score",
           title="damping selection (ringed: chosen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    out = fig_dir / "select.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [out]

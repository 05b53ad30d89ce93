"""TRAK (Park et al. 2023): influence from randomly projected per-example gradients and the inverse of their kernel.

For a training point ``z`` the features are ``φ_z = R^T ∇f_z`` (``proj_dim`` numbers), with ``f`` TRAK's output
function and ``R`` a seeded random ``P x proj_dim`` projection; their kernel is ``G = Φ^T Φ / n`` (mean over the
training set, the same convention as every other solver's ``G``). The score of ``z`` for query ``q`` is

    ``τ(q, z) = φ_q^T (G + λI)^-1 φ_z · (1 - p_z)``

* ``output="margin"`` (TRAK's, classification): ``f = log(p / (1 - p))`` of the correct class, i.e. the correct
  logit minus the log-sum-exp of the others, and the **out-to-loss weighting** ``Q_z = 1 - p_z`` (the probability
  of the training point's label, from the trained model; ``∂loss/∂f = -(1 - p)`` for cross-entropy, so
  ``-∇loss_z = (1 - p_z) ∇f_z`` and positive scores are helpful, as for every solver). Queries use ``∇f_q`` (TRAK's
  "target" gradient, no weighting), or the task's measurement when it is not the loss. ``weighting=false`` leaves
  ``Q`` out (for averaging ``Q`` over an ensemble separately, as TRAK does, see below).
* ``output="loss"``: the task's loss gradients and no weighting; with ``projection="identity"`` the score is
  then exactly ``g_q^T (F + λI)^-1 g_z`` with ``F`` the empirical Fisher (``solver=exact curvature=empirical_fisher``).

The kernel is unnormalised in TRAK's papers and code (``(Φ^T Φ + λ' I)^-1``): their scores are these divided by
``n``, at ``λ' = n λ``. ``damping``: a float, ``auto`` (0.1 x the mean eigenvalue of ``G``) or a list, all from one
eigendecomposition; ``0`` is the pseudo-inverse (eigenvalues below ``proj_dim x`` the dtype's epsilon x the largest
are dropped; TRAK's own default is no regularisation).

**Projection** (``projection``): ``rademacher`` (entries ``±1 / sqrt(proj_dim)``), ``gaussian`` (``N(0, 1 /
proj_dim)``) or ``identity`` (no projection: ``φ = ∇f``, ``proj_dim`` unused; tiny models). ``R`` is never needed
whole: its rows come in chunks of :data:`ROWS` consecutive flat parameters (the :mod:`.layout` order), chunk ``c``
drawn from a generator on the solver's device seeded with ``s x 1,000,003 + c`` (``s``: the projection seed, ``seed``
for a single model; see Ensembles) (rademacher: ``randint(0, 2)`` mapped to ±1; gaussian: float32 ``randn``), so
any block of ``R`` is reproduced on its own and the result does not depend on batch sizes. ``R`` is kept in memory
when it fits in ``cache_gb`` and otherwise regenerated chunk by chunk for every batch. The fit's training features
``Φ`` (and ``1 - p``) are kept in memory too when they fit in ``cache_gb`` (``n x dim`` numbers; a fit computed in
this process, whole and on one device): pairwise scores against the fitted training data then take them instead of a
second pass over it (as the trak library scores from its stored features). Per-example gradients come from
the hooks of :mod:`.blocks` (torch.func for modules they cannot express), layer by layer, each projected at once (no
``[batch, P]`` matrix on the hook path).

**Ensembles** (TRAK's ``M`` models): ``score.ensemble=M`` / ``Attributor([m1, ..., mM])`` give TRAK's estimator,
``τ(q, z) = mean_m[φ_q,m^T (G_m + λI)^-1 φ_z,m] · mean_m[1 - p_z,m]``: the models' unweighted kernel scores and their
``Q = 1 - p`` averaged separately, then multiplied (Park et al. 2023, Alg. 1; the ``trak`` library and dattri do the
same), each model with its own kernel, features and **projection**: model ``i`` (0, 1, ...) draws ``R`` from seed
``seed + 10,000 i``, as the ``trak`` library seeds its projector per model id and dattri per ensemble id. Averaging
over models then averages out the projection's error as well as training noise (experiments/RESULTS.md section
4b: on dattri's MNIST logistic regression, where the models barely differ, one ``R`` shared by all of them kept
TRAK-10's LDS at TRAK-1's). With ``weighting=false`` the scores are the mean kernel scores alone.
TRAK's optional soft-thresholding of the scores is not applied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..data.base import LabeledData, batch_to
from ..errors import ConfigError, check
from ..progress import progress
from ..tasks import ClassificationTask, Task
from .base import Damping, Solver
from .blocks import BlockGradSolver, Capture, capturable
from .layout import Block, ParamLayout

#: rows of the projection generated together from one seed (the unit in which ``R`` is reproduced)
ROWS = 1024
PROJECTIONS = ("rademacher", "gaussian", "identity")
OUTPUTS = ("margin", "loss")
#: a dense identity "projection" beyond this many tracked parameters would be a P x P kernel
MAX_IDENTITY = 20_000


def margin(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """TRAK's classification output ``log(p / (1 - p))`` of the correct class: its logit minus the log-sum-exp of
    the others (``[b]`` from logits ``[b, C]``)."""
    hit = torch.arange(output.shape[-1], device=output.device) == target.unsqueeze(-1)
    correct = (output * hit).sum(-1)
    return correct - output.masked_fill(hit, float("-inf")).logsumexp(-1)


def projection_chunk(c: int, rows: int, k: int, kind: str, seed: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """Rows ``[c ROWS, c ROWS + rows)`` of the projection ``R`` (``[rows, k]``), as documented in the module."""
    g = torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(c))
    if kind == "rademacher":
        r = torch.randint(0, 2, (rows, k), generator=g, device=device).to(dtype).mul_(2).sub_(1)
    else:
        r = torch.randn(rows, k, generator=g, device=device, dtype=torch.float32).to(dtype)
    return r.div_(math.sqrt(k))


class _Measured(Task):
    """``task`` with its per-example loss replaced by ``fn`` (the hooks backpropagate ``task.loss``)."""

    def __init__(self, task: Task, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self._task, self._fn = task, fn

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        return self._task.forward(model, inputs)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._fn(output, target)


class TRAK(BlockGradSolver):
    """Projected-gradient kernel attribution (see the module docstring)."""

    name = "trak"
    vectors = "TRAK features (output gradients projected to solver.proj_dim, weighted by 1 - p)"
    curvatures = ("empirical_fisher",)  # G: the mean of φ φ^T over the training points (projected output gradients)
    _hooks = True

    def __init__(self, damping: Any = 0.0, curvature: str = "empirical_fisher", modules: Any = "all",
                 dtype: str = "float32", batch_size: int = 128, device: str = "cpu", seed: int = 0,
                 autocast: str | None = None, task: Task | str | None = None, proj_dim: int = 2048,
                 projection: str = "rademacher", output: str = "margin", weighting: bool = True,
                 cache_gb: float = 1.0):
        super().__init__(damping, curvature, modules, dtype, batch_size, device, seed, autocast, task)
        check(isinstance(proj_dim, int) and not isinstance(proj_dim, bool) and proj_dim >= 1, "solver.proj_dim",
              proj_dim, "must be an integer >= 1 (TRAK uses 512 to 20,480)")
        check(projection in PROJECTIONS, "solver.projection", projection, f"use one of {', '.join(PROJECTIONS)}")
        check(output in OUTPUTS, "solver.output", output,
              "use margin (TRAK's, classification) or loss (the task's loss gradients)")
        check(isinstance(weighting, bool), "solver.weighting", weighting, "use true or false")
        check(isinstance(cache_gb, (int, float)) and cache_gb >= 0, "solver.cache_gb", cache_gb, "must be >= 0")
        self.proj_dim, self.projection, self.output, self.weighting = proj_dim, projection, output, weighting
        self.cache_gb = float(cache_gb)
        self.state: dict[str, torch.Tensor] = {}
        self._R: torch.Tensor | None = None
        self._member = 0
        self._deferred = False  # Q left to the ensemble (defer_weights)
        self._kept_train: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the fit's (Φ, 1 - p)

    @property
    def has_train_weights(self) -> bool:  # type: ignore[override]
        return self.output == "margin" and self.weighting

    def defer_weights(self, on: bool) -> None:
        """An ensemble multiplies the mean of its models' kernel scores by the mean of their ``1 - p``: each
        model's scores are then unweighted (see the module docstring)."""
        self._deferred = bool(on) and self.has_train_weights

    def train_weights(self, model: nn.Module, data: Any) -> torch.Tensor:
        """``1 - p_z`` of every training point of ``data`` under ``model``, ``[n]``."""
        return torch.cat([self.weights(model, x, y) for x, y, _ in data.batches(self.batch_size)])

    def score_config(self) -> dict[str, Any]:
        return {"weights": "deferred to the ensemble"} if self._deferred else {}

    def for_member(self, index: int) -> None:
        """Model ``index`` of an ensemble projects with its own ``R`` (seed ``seed + 10,000 index``)."""
        if index != self._member:
            self._member, self._R = int(index), None

    # -- set-up ---------------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module) -> ParamLayout:
        layout = super().setup(model)
        self._hooks = all(capturable(m) for m in layout.modules.values())
        if self.projection == "identity" and layout.size > MAX_IDENTITY:
            raise ConfigError(f"solver.projection=identity on {layout.size:,} tracked parameters is invalid: the kernel "
                              f"would be {layout.size:,} x {layout.size:,} (at most {MAX_IDENTITY:,}); use "
                              f"solver.projection=rademacher")
        if self._R is not None and len(self._R) != layout.size:
            self._R = None
        self._kept_train = None  # (another model's features)
        return layout

    def _check_task(self) -> None:
        if self.output == "margin" and not isinstance(self.task, ClassificationTask):
            raise ConfigError(f"solver.output=margin is invalid for task {self.task.name}: TRAK's margin needs class "
                              f"labels; use solver.output=loss")

    @property
    def dim(self) -> int:
        """The number of features per example: ``proj_dim``, or ``P`` without a projection."""
        assert self.layout is not None, "call setup(model) first"
        return self.layout.size if self.projection == "identity" else self.proj_dim

    def fit_config(self) -> dict[str, Any]:
        cfg = super().fit_config()
        cfg.pop("cache_gb", None)  # (where R lives, not what it is)
        if self._member:  # another R (the first model's key is what it was before members had their own)
            cfg["projection_seed"] = self.projection_seed
        return cfg

    # -- the projection -------------------------------------------------------------------------------------------
    def projection_matrix(self) -> torch.Tensor:
        """``R`` whole, ``[P, proj_dim]`` (built chunk by chunk; for tests and small models)."""
        assert self.layout is not None, "call setup(model) first"
        if self.projection == "identity":
            return torch.eye(self.layout.size, dtype=self.dtype, device=self.device)
        return torch.cat([self._chunk(c) for c in range(math.ceil(self.layout.size / ROWS))])

    def _chunk(self, c: int) -> torch.Tensor:
        assert self.layout is not None
        rows = min(ROWS, self.layout.size - c * ROWS)
        return projection_chunk(c, rows, self.proj_dim, self.projection, self.projection_seed, self.dtype,
                                self.device)

    @property
    def projection_seed(self) -> int:
        """The seed ``R`` is drawn from: ``seed`` for an ensemble's first model, ``seed + 10,000 i`` for model i."""
        return int(self.seed) + 10_000 * self._member

    def _kept(self) -> torch.Tensor | None:
        """``R`` when it fits in ``cache_gb`` (built once), else ``None``."""
        assert self.layout is not None
        if self._R is None and self.layout.size * self.proj_dim * self.dtype.itemsize <= self.cache_gb * 2 ** 30:
            self._R = self.projection_matrix()
        return self._R

    def _project_into(self, out: torch.Tensor, g: torch.Tensor, offset: int) -> None:
        """``out += g @ R[offset:offset + width]`` for gradient columns ``g [b, width]`` starting at flat ``offset``."""
        w = g.shape[1]
        if self.projection == "identity":
            out[:, offset:offset + w] += g
            return
        R = self._kept()
        if R is not None:
            out += g @ R[offset:offset + w]
            return
        for c in range(offset // ROWS, (offset + w - 1) // ROWS + 1):
            lo, hi = max(offset, c * ROWS), min(offset + w, (c + 1) * ROWS)
            out += g[:, lo - offset:hi - offset] @ self._chunk(c)[lo - c * ROWS:hi - c * ROWS]

    # -- features -------------------------------------------------------------------------------------------------
    def _fn(self, query: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """What is differentiated: TRAK's margin or the task's loss; a query's measurement when it is not the loss."""
        if query and not self.task.measures_loss:
            return self.task.measurement
        return margin if self.output == "margin" else self.task.loss

    @contextmanager
    def _measuring(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
        task = self.task
        self.task = _Measured(task, fn)
        try:
            yield
        finally:
            self.task = task

    def features(self, model: nn.Module, x: Any, y: torch.Tensor, query: bool = False) -> torch.Tensor:
        """Unweighted features ``φ = R^T ∇f`` of a batch, ``[b, dim]`` (``query``: the queries' function)."""
        assert self.layout is not None, "call setup(model) first"
        self._check_task()
        fn = self._fn(query)
        out = torch.zeros(len(y), self.dim, dtype=self.dtype, device=self.device)
        if not self._hooks:
            self._project_into(out, Solver._grads(self, model, x, y, fn), 0)
            return out

        def project(cap: Capture, i: int, b: Block) -> None:  # (during the backward pass: see _captured)
            self._project_into(out, self._block_grads(cap, b).reshape(len(y), -1).to(self.dtype), b.offset)

        with self._measuring(fn):
            self._each_block(model, x, y, project)
        return out

    def weights(self, model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor | None:
        """TRAK's out-to-loss weights ``1 - p`` of a batch's labels ``[b]`` (``None`` when not weighted)."""
        if self.output != "margin" or not self.weighting:
            return None
        with torch.no_grad(), self.amp():
            out = self.task.forward(model, batch_to(x, self.device, self.dtype)).to(self.dtype)
        return torch.sigmoid(-margin(out, y.to(self.device)))

    # -- fit: the kernel ------------------------------------------------------------------------------------------
    def fit(self, model: nn.Module, data: LabeledData, snapshots=None) -> None:
        """``G = Φ^T Φ / n`` over the training set and its eigendecomposition (resumable from snapshots)."""
        if self.layout is None:
            self.setup(model)
        self._check_task()
        self._snapshots = snapshots
        try:
            shard = data.subset(distributed.shard(len(data)))
            K = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
            n = torch.zeros((), dtype=torch.float64, device=self.device)
            sums = {"kernel": K, "n": n}
            done = self._resume("kernel", sums, None)
            # the training features (and 1 - p) kept for scoring this data: a whole, unresumed, unsharded pass
            # whose features fit in cache_gb (the trak library stores them too)
            keep = (done == 0 and distributed.world_size() == 1
                    and len(data) * self.dim * self.dtype.itemsize <= self.cache_gb * 2 ** 30)
            kept: list[tuple[torch.Tensor, torch.Tensor | None]] = []
            for x, y, _ in progress(shard.batches(self.batch_size, skip=done), desc=f"{self.name} kernel"):
                phi = self.features(model, x, y)
                if keep:
                    kept.append((phi, self.weights(model, x, y)))
                phi = phi.double()
                K += phi.T @ phi
                n += len(y)
                done += 1
                self._snapshot("kernel", done, sums, None)
            distributed.all_reduce_sum(K)
            distributed.all_reduce_sum(n)
        finally:
            self._snapshots = None
        G = K / n
        evals, evecs = torch.linalg.eigh((G + G.T) / 2)
        self.load_state_dict({"evals": evals.clamp_min(0), "evecs": evecs.contiguous(), "n": n})  # (see EKFAC.fit)
        if keep:
            w = [k[1] for k in kept]
            self._kept_train = (torch.cat([k[0] for k in kept]), None if w[0] is None else torch.cat(w))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.to(self.device) for k, v in state.items()}
        self._mean_eig = None
        self._kept_train = None  # (a cached fit: its features were not stored with it)

    def mean_eigenvalue(self) -> float:
        assert self.state, "fit the solver first"
        return float(self.state["evals"].mean())

    def precondition(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        """``(G + λI)^-1 v`` for features ``[k, dim]`` (``λ = 0``: the pseudo-inverse)."""
        assert self.state, "fit the solver first"
        lam = self.resolve_damping(damping)
        e, V = self.state["evals"], self.state["evecs"]
        if lam > 0:
            inv = 1.0 / (e + lam)
        else:
            keep = e > e.max() * len(e) * torch.finfo(self.dtype).eps
            inv = torch.where(keep, 1.0 / e.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(e))
        return (((v.double() @ V) * inv) @ V.T).to(self.dtype)

    # -- scores ---------------------------------------------------------------------------------------------------
    def train_grads(self, model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
        """The training side of a score, ``[b, dim]``: ``φ_z (1 - p_z)`` (``φ_z`` unweighted, see :meth:`weights`)."""
        phi = self.features(model, x, y)
        w = None if self._deferred else self.weights(model, x, y)
        return phi if w is None else phi * w[:, None]

    def query_grads(self, model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
        """The query side, ``[b, dim]``: ``φ_q`` (never weighted)."""
        return self.features(model, x, y, query=True)

    def prepare_queries(self, preconditioned: torch.Tensor) -> torch.Tensor:
        return preconditioned.to(self.dtype)

    def pairwise(self, model: nn.Module, preconditioned: torch.Tensor, x: Any, y: torch.Tensor) -> torch.Tensor:
        return Solver.pairwise(self, model, preconditioned, x, y)

    def pairwise_fitted(self, preconditioned: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """From the features the fit kept (when it kept them): ``φ_q (G + λI)^-1 φ_z (1 - p_z)`` without a second
        pass over the training data."""
        if self._kept_train is None:
            return None
        phi, w = self._kept_train
        side = phi[positions]
        if w is not None and not self._deferred:
            side = side * w[positions, None]
        return preconditioned @ side.T

    def self_influence(self, model: nn.Module, x: Any, y: torch.Tensor,
                       dampings: Sequence[Damping]) -> torch.Tensor:
        """``φ_z^T (G + λI)^-1 φ_z (1 - p_z)`` per example and damping: ``[len(dampings), b]``."""
        phi = self.features(model, x, y)
        w = None if self._deferred else self.weights(model, x, y)
        out = torch.stack([(self.precondition(phi, d) * phi).sum(1) for d in dampings])
        return out if w is None else out * w[None]

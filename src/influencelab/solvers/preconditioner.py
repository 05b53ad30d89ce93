"""A fitted Kronecker-factored inverse (EK-FAC or K-FAC) used as the preconditioner ``P^-1`` of an iterative
solver (CG, LiSSA) on the same damped system ``(G + λI) x = v`` every solver solves (ASTRA, arXiv 2507.14740, for
the stochastic Neumann series; preconditioned CG is its deterministic counterpart).

``P^-1 = (G_EKFAC + λ_P I)^-1`` with ``λ_P`` the solve's own damping (``preconditioner_damping: same``, default) or
a fixed value. The preconditioner is a solver of the ``solver`` group that the iterative solver composes with its
own seed, modules, dtype and curvature (``fisher`` for a Hessian solve: EK-FAC estimates the Gauss-Newton part;
:mod:`~influencelab.solvers.iterative`) and hands over built, so its fit key is the one a ``solver=ekfac`` run of
the same model has, and :meth:`~influencelab.artifacts.Artifacts.fit` reuses that cached fit instead of refitting.
The iterative solver's result does not depend on ``P`` at convergence; only the number of iterations does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, check

if TYPE_CHECKING:
    from .base import Solver

#: the solvers that can precondition (they apply their inverse in closed form, at any damping)
PRECONDITIONERS = ("ekfac", "kfac")


def check_spec(preconditioner: Any, damping: Any) -> None:
    """One-line errors for ``solver.preconditioner`` / ``solver.preconditioner_damping``."""
    given = (preconditioner is not None and not isinstance(preconditioner, str)
             and hasattr(preconditioner, "precondition"))  # a solver object
    check(preconditioner is None or given or preconditioner in PRECONDITIONERS,
          "solver.preconditioner", preconditioner, f"use null or one of {', '.join(PRECONDITIONERS)}")
    ok = damping == "same" or (isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping > 0)
    check(ok, "solver.preconditioner_damping", damping, "use same (the solve's damping) or a float > 0")


class Preconditioner:
    """A built preconditioning ``solver`` (fitted or not; fitted through the artifacts like any solver, see
    :meth:`~influencelab.solvers.iterative.IterativeSolver.components`) at ``damping`` (``same`` or a float),
    applied row-wise at per-row dampings. Knows nothing of the solver it preconditions: that one composes it
    (:meth:`~influencelab.solvers.iterative.IterativeSolver.build_preconditioner`) and hands it over."""

    def __init__(self, solver: Solver, damping: Any = "same"):
        self.solver, self.damping = solver, damping

    @property
    def name(self) -> str:
        return self.solver.name

    def fit_config(self) -> dict[str, Any]:
        """What the preconditioned solve depends on beyond the owner's own keys."""
        return {"fit": self.solver.fit_config(), "damping": self.damping}

    def lambdas(self, lam: torch.Tensor) -> torch.Tensor:
        """The preconditioner's damping per row given the solve's (``same``: equal to it)."""
        return lam if self.damping == "same" else torch.full_like(lam, float(self.damping))

    def apply(self, r: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """``(G_P + λ_P I)^-1 r`` row-wise; ``lam`` ``[rows, 1]`` the solve's damping of each row (rows of equal
        damping are applied together)."""
        s = self.solver
        if s.layout is None or not s.state_dict():
            raise ConfigError(f"the {self.name} preconditioner is not fitted: fit the solver through "
                              "Attributor.fit / Artifacts.fit (which fits its components)")
        lp = self.lambdas(lam).flatten()
        out = torch.empty_like(r)
        for value in torch.unique(lp):
            rows = (lp == value).nonzero().flatten()
            out[rows] = s.precondition(r[rows].to(s.dtype), float(value)).to(r.dtype)
        return out

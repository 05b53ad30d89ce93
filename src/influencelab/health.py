"""Numerical health checks shared by the fit paths (a leaf module: torch and the errors only): a model's
parameters and a solver's curvature factors must be finite, and factors absurdly large are warned about."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import NonFiniteError

log = logging.getLogger("influencelab")

#: curvature factors with an entry this large are absurd (a diverged model; float32 products overflow near 3e38)
ABSURD_FACTOR = 1e18


def check_parameters(model: nn.Module) -> None:
    """A one-line error naming the first parameter of ``model`` holding NaN or inf (a diverged or corrupt model),
    before curvature is fitted on it."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            n = int((~torch.isfinite(p)).sum())
            raise NonFiniteError(f"the model's parameter {name} holds {n} NaN/inf values (of {p.numel()}): it has "
                                 f"diverged or its weights are corrupt; retrain it (a lower learning rate) or reload "
                                 f"its weights")


def check_factors(label: str, state: dict[str, torch.Tensor], source: str) -> None:
    """Curvature factors must be finite (else a one-line error: the model's gradients overflow) and not absurdly
    large (a warning: scores from them are rounding noise or overflow float32)."""
    for k, t in state.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
            continue
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            raise NonFiniteError(
                f"{source} gave {label} curvature factors with NaN/inf values ({k}: {int((~finite).sum())} of "
                f"{t.numel()}): the model's gradients overflow (a diverged model?); check its training loss, or "
                f"use solver.dtype=float64" + (" (and delete that cache entry)" if "cache" in source else ""))
        biggest = float(t.abs().max())
        if biggest > ABSURD_FACTOR:
            log.warning("%s gave absurdly large %s curvature factors (%s: max |value| %.3g): the model has probably "
                        "diverged (check its training loss); its scores may overflow float32 (solver.dtype=float64)",
                        source, label, k, biggest)
            return

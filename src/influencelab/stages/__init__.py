"""The stages ``stages: [...]`` selects, one module per study: :mod:`.core` (train, fit, pairwise, self),
:mod:`.mislabel`, :mod:`.attribution`, :mod:`.ihvp`, :mod:`.lds`, :mod:`.loo`, :mod:`.unlearn`. Adding a study =
one module here (registering itself with :func:`.registry.stage`) + its presets in ``conf/experiment/``."""

from __future__ import annotations

import importlib
import pkgutil

from .registry import SECTIONS, STAGES, Stage


def load_all() -> dict[str, Stage]:
    """Import every stage module of this package (each registers itself); returns the registry."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "registry":
            importlib.import_module(f"{__name__}.{info.name}")
    return STAGES


__all__ = ["SECTIONS", "STAGES", "Stage", "load_all"]

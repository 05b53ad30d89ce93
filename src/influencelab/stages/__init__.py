"""The stages ``stages: [...]`` selects, one module per study: :mod:`.core` (train, fit, pairwise, self),
:mod:`.mislabel`, :mod:`.attribution`, :mod:`.ihvp`, :mod:`.lds`, :mod:`.loo`, :mod:`.unlearn`. Adding a study =
one module here (registering itself with :func:`influencelab.registry.stage`) + its presets in
``conf/experiment/``.

The registry itself lives above this package (:mod:`influencelab.registry`): the modules that read it never
import a stage module, and :func:`load_all`, called once by whoever starts a run (:mod:`.cli`) or a report
(:mod:`.report`), fills it."""

from __future__ import annotations

import importlib
import pkgutil

from ..registry import SECTIONS, STAGES, Stage


def load_all() -> dict[str, Stage]:
    """Import every stage module of this package (each registers itself); returns the registry."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return STAGES


__all__ = ["SECTIONS", "STAGES", "Stage", "load_all"]

"""The stage registry: ``stages: [...]`` in the config names entries of :data:`STAGES`.

A stage module (one per study, in :mod:`influencelab.stages`) registers its function with :func:`stage`, together
with the typed schema of its config section (checked before any data is read) and, optionally, the comparison plot
it adds to ``influencelab-report``. The registry sits above the stages: it imports nothing of the package, so the
stage modules register here and the modules that read it (:mod:`.pipeline`, :mod:`.schema`, :mod:`.report`,
:mod:`.cli`) never import a stage module; whoever starts a run or a report fills it once with
:func:`influencelab.stages.load_all` (``tests/test_imports.py`` keeps the import graph free of circles).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Stage:
    name: str
    fn: Callable[[Any], None]
    #: the config section this stage reads (``lds``, ``unlearn``, ...) and its dataclass schema
    section: str | None = None
    schema: type | None = None
    #: ``precheck(ctx)``: checks of the config against the dataset spec, run before any data is read
    precheck: Callable[[Any], None] | None = None
    #: ``report(root, rows, fig_dir) -> [figure paths]``: its comparison plot over a sweep's jobs
    report: Callable[[Path, list[dict[str, Any]], Path], list[Path]] | None = None


STAGES: dict[str, Stage] = {}
#: config sections and their schemas (a section may be read by several stages, e.g. ``unlearn``)
SECTIONS: dict[str, type] = {}


def stage(name: str, section: str | None = None, schema: type | None = None,
          precheck: Callable[[Any], None] | None = None):
    """Register the decorated ``fn(ctx)`` as stage ``name`` (reading config ``section`` of type ``schema``;
    ``precheck(ctx)`` validates it against the dataset spec up front)."""

    def deco(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        STAGES[name] = Stage(name, fn, section, schema, precheck)
        if section is not None and schema is not None:
            SECTIONS[section] = schema
        return fn

    return deco


def report_plot(name: str):
    """Register the decorated ``plot(root, rows, fig_dir)`` as stage ``name``'s report figure."""

    def deco(fn):
        STAGES[name].report = fn
        return fn

    return deco

"""Per-damping metric names, written and read through one codec.

A run that scores several dampings (a ``solver.damping`` list) logs one metric per damping, named
``<base>@<damping>`` (``ihvp/rel_error@0.001``, ``solver/iterations@1e-05``, ``lds/mean@auto``) or, where the
damping qualifies a ranking whose metrics follow, ``<base>@<damping>/<rest>``
(``mislabel/self_influence@0.1/recall@10``). :func:`metric_name` writes such a name, :func:`parse_metric_name`
reads any of them back to ``(name without its @<damping>, damping)``; ``influencelab.load_sweep`` and
``influencelab-report`` read through it.

The number is spelt one of two ways, both of which committed results (``experiments/results/*/report.csv``,
``experiments/tables.py``) and W&B dashboards already hold, so new runs keep writing them as before:

* 6 significant digits (``f"{λ:g}"``: ``0.001``, ``1e-05``, ``1``): the ihvp stage, the ``solver/*`` convergence
  metrics and the convergence records' JSON keys (:func:`damping_label`);
* ``exact=True``, Python's ``repr`` of the float (``0.001``, ``1e-05``, ``1.0``): the lds and mislabel stages, which
  also log their run's first damping under the bare name (``lds/mean`` beside ``lds/mean@0.1``).

The reader accepts both (``@1`` and ``@1.0`` are the same damping, rounded to 6 significant digits). An ``@K``
after one of :data:`PARAMETERS` is that metric's parameter, not a damping (``recall@10``: recall in the top 10%).
"""

from __future__ import annotations

import math
import re
from typing import Any

Damping = float | str  # a float >= 0 or "auto" (as :func:`influencelab.solvers.base.parse_dampings` gives)

#: metrics whose ``@K`` is a parameter, not a damping: ``recall@10`` (recall in the top 10%), ``minus_loss@10``
#: (that recall minus the loss baseline's)
PARAMETERS = frozenset({"recall", "minus_loss"})

#: ``<head>@<damping>`` at the end of a name or before a ``/``
_TAGGED = re.compile(r"^(?P<head>[^@]*?)@(?P<damping>\d[\d.eE+-]*|auto)(?P<rest>/.*)?$")


def damping_label(damping: Damping, exact: bool = False) -> str:
    """A damping as metric names (and JSON keys) write it: ``0.001`` -> ``"0.001"``, ``1.0`` -> ``"1"`` (6
    significant digits) or, ``exact``, ``"1.0"`` (the float's repr); ``"auto"`` as is."""
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(f"a damping is a number or 'auto', not {damping!r}")
        return damping
    return repr(float(damping)) if exact else f"{float(damping):g}"


def metric_name(base: str, damping: Damping | None = None, rest: str | None = None, exact: bool = False) -> str:
    """``<base>@<damping>`` (``<base>`` when ``damping`` is None), then ``/<rest>`` when given; the damping spelt
    by :func:`damping_label`. ``parse_metric_name`` reads it back."""
    if base.rsplit("/", 1)[-1] in PARAMETERS or "@" in base:
        raise ValueError(f"{base!r} cannot carry a damping: its '@' would be read as the metric's parameter")
    name = base if damping is None else f"{base}@{damping_label(damping, exact)}"
    return name if rest is None else f"{name}/{rest}"


def damping_value(d: Any) -> float | str | None:
    """A damping as a number (6 significant digits, as metric names write it: ``1e-3``, ``"0.001"`` -> 0.001),
    ``"auto"``, or ``None`` when ``d`` is none of these."""
    if d is None or isinstance(d, bool):
        return None
    if isinstance(d, str) and d.strip() == "auto":
        return "auto"
    try:
        x = float(d)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else float(f"{x:.6g}")


def parse_metric_name(name: str) -> tuple[str, float | str | None]:
    """``(name without its @<damping>, damping)`` of a per-damping metric name, ``(name, None)`` for any other:
    ``"mislabel/self_influence@0.1/recall@10"`` -> ``("mislabel/self_influence/recall@10", 0.1)``,
    ``"mislabel/loss/recall@10"`` -> itself and ``None``."""
    m = _TAGGED.match(name)
    if m is None or m["head"].rsplit("/", 1)[-1] in PARAMETERS:
        return name, None
    return m["head"] + (m["rest"] or ""), damping_value(m["damping"])

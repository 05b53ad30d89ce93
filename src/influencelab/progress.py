"""Progress bars for long loops (training epochs, curvature passes, score chunks, LiSSA steps)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable, **kwargs):
    """A tqdm bar that stays quiet when stderr is not a terminal."""
    return tqdm(iterable, disable=not sys.stderr.isatty(), leave=False, dynamic_ncols=True, **kwargs)

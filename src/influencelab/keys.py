"""Unknown keys and names in a config: the one-line error that says so, with a did-you-mean from the names that
exist (:func:`did_you_mean`, difflib's close matches) and the keys the node has."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from .errors import ConfigError


class UnknownKeyError(ConfigError):
    """A key, config group or group option that does not exist (a typo, usually). In a multirun it stops the whole
    sweep before anything is written, where a bad value only stops its own job."""


def close(word: str, names: Iterable[str], n: int = 1) -> list[str]:
    """The names closest to ``word`` (difflib, cutoff 0.6), best first; case is ignored."""
    names = sorted({str(x) for x in names})
    lower = {x.lower(): x for x in names}
    return [lower[m] for m in difflib.get_close_matches(word.lower(), list(lower), n=n, cutoff=0.6)]


def did_you_mean(word: str, names: Iterable[str], prefix: str = "", suffix: str = "") -> str:
    """``" did you mean <prefix><match><suffix>?"`` for the name closest to ``word``, or ``""``."""
    found = close(word, names)
    return f" did you mean {prefix}{found[0]}{suffix}?" if found else ""


def listing(names: Iterable[str], limit: int = 24) -> str:
    """``a, b, c`` (sorted; at most ``limit``, then ``...``)."""
    names = sorted({str(x) for x in names})
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def unknown_key(path: str, owner: str, keys: Iterable[str], fix: str = "") -> UnknownKeyError:
    """``<path> is not a key of <owner>: did you mean <parent>.<match>? (its keys: ...)``; ``fix``: what else to
    do (e.g. remove it with ``~path``)."""
    keys = [k for k in keys if not str(k).startswith("_")]
    parent, _, leaf = path.rpartition(".")
    hint = did_you_mean(leaf, keys, prefix=f"{parent}." if parent else "")
    parts = [f"{path} is not a key of {owner}:" + hint if hint else f"{path} is not a key of {owner};"]
    if fix:
        parts.append(fix + ";" if keys else fix)
    if keys:
        parts.append(f"its keys: {listing(keys)}")
    return UnknownKeyError(" ".join(parts))

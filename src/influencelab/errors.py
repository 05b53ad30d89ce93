"""User-facing errors: each one prints as a single line naming the bad value and the fix."""

from __future__ import annotations

from typing import Any


class InfluenceLabError(Exception):
    """Base class for errors the CLI reports in one line (no traceback unless HYDRA_FULL_ERROR=1)."""


class ConfigError(InfluenceLabError, ValueError):
    """An invalid configuration value."""


class DataNotFoundError(InfluenceLabError, FileNotFoundError):
    """Dataset files are missing and could not be downloaded."""


class SolverDivergedError(InfluenceLabError, ArithmeticError):
    """An iterative solver produced NaN/inf or a growing norm."""


class FileFaultError(InfluenceLabError, OSError):
    """A file the run writes or reads failed: full disk, permissions, a file where a directory belongs, ... (the
    message names the file, the cause and the fix)."""


class CorruptFileError(FileFaultError):
    """A file exists but is truncated, corrupt or written by another version (the message says how to regenerate
    it)."""


class NonFiniteError(InfluenceLabError, ArithmeticError):
    """Non-finite (or overflowing) numbers: in the data, a diverged training, curvature factors or scores."""


class TrainingDivergedError(NonFiniteError):
    """Training blew up: its loss became non-finite or rose by an order of magnitude or more."""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a one-line `ConfigError` unless `ok`: ``key=value is invalid: allowed``."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")

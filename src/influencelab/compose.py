"""Configs to objects: Hydra's ``instantiate`` with the project's one-line errors, and solver configs composed
from the ``solver`` config group (``conf/solver/<name>.yaml``) for the Python API and for stages that need a
second solver (a baseline, a reference)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from .errors import InfluenceLabError
from .keys import UnknownKeyError, did_you_mean, unknown_key

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our one-line errors through unwrapped."""
    try:
        return instantiate(node, **{"_convert_": "all", **kwargs})
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, InfluenceLabError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        if isinstance(e.__cause__, TypeError) and "unexpected keyword argument" in str(e.__cause__):
            bad = str(e.__cause__).rsplit("argument", 1)[-1].strip(" '")
            raise unknown_target_key(node, bad) from None
        raise


def unknown_target_key(node: Any, bad: str) -> UnknownKeyError:
    """The error for key ``bad`` of config ``node`` that its ``_target_`` does not take: named by the node's place
    in the config (``trainer.epoch``), with a did-you-mean from the target's parameters."""
    target = str(node.get("_target_", "?"))
    where = node._get_full_key(None) if OmegaConf.is_config(node) else ""
    path = f"{where}.{bad}" if where else bad
    try:
        params = [p.name for p in inspect.signature(get_object(target)).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]
    except Exception:  # noqa: BLE001 (no signature: no suggestion)
        params = []
    owner = f"{where} ({target.rsplit('.', 1)[-1]})" if where else target.rsplit(".", 1)[-1]
    return unknown_key(path, owner, params, fix=f"correct or remove it (~{path})")


def plain(node: Any) -> Any:
    """A resolved plain container of a config node (anything else unchanged)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def solver_names() -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "solver").glob("*.yaml"))


def solver_node(name: str, overrides: dict[str, Any] | DictConfig | None = None, seed: int = 0) -> DictConfig:
    """The ``solver`` group's config ``name`` composed by Hydra (``+solver=name``), with ``seed`` and then
    ``overrides`` merged in (typed values kept)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if name not in solver_names():
        raise UnknownKeyError(f"solver={name!r} is invalid: not an option of solver:"
                              f"{did_you_mean(name, solver_names())} options: {', '.join(solver_names())}")
    ov = [f"+solver={name}", f"+seed={int(seed)}"]
    gh = GlobalHydra.instance()
    if gh.is_initialized():  # inside the Hydra app (or a test's initialize): same config search path
        node = compose(config_name=None, overrides=ov).solver
    else:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            node = compose(config_name=None, overrides=ov).solver
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    unknown = [k for k in (overrides or {}) if k not in node]
    if unknown:
        raise unknown_key(str(unknown[0]), f"solver {name}", [str(k) for k in node])
    return OmegaConf.merge(node, overrides or {})


def solver_config(name: str, overrides: dict[str, Any] | None = None, seed: int = 0, **kwargs: Any):
    """A :class:`~influencelab.solvers.base.Solver` from the ``solver`` group (see :func:`solver_node`);
    ``kwargs`` (``device``, ``task``) go to its constructor."""
    return build(solver_node(name, overrides, seed), **kwargs)

"""The command line checked before Hydra writes anything (no ``outputs/<date>/<time>/``, no multirun folder).

:func:`check_command_line` composes the config of each job the command line describes (one, or each of a multirun's)
with Hydra's compose API, as the app will, and turns Hydra's composition errors into the project's one-line errors
(exit 2) with a did-you-mean from the names that exist: a bad key (``trainer.epoch=1``), a key added with ``+`` that
nothing reads, a bad group (``datset=digits``) or group option (``solver=lisa``). A run's config is then validated
the way the run validates it (:class:`~influencelab.pipeline.Context`: every section the stages read, the dataset,
model, trainer, task, solver and logger built; no data read). In a multirun a bad key or name in any job stops the
sweep before it starts; a bad value stops only its own job (recorded by the sweep), unless every job has one.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import schema
from .compose import CONFIG_DIR, build
from .errors import ConfigError, InfluenceLabError
from .keys import UnknownKeyError, close, listing, unknown_key

#: multiruns with more jobs than this have one job per combination of swept config groups checked
MAX_CHECKED_JOBS = 64


def parse_args(argv: Sequence[str]) -> Any:
    """Hydra's own parse of the command line; ``None`` when it asks for no run or composes from another config
    directory (help, shell completion, ``--info``, ``--config-path``/``--config-dir``, ``--experimental-rerun``)."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(list(argv))
    if args.help or args.hydra_help or args.shell_completion or args.info or args.experimental_rerun \
            or args.config_path or args.config_dir:
        return None
    return args


def first_line(text: Any) -> str:
    return (str(text).strip().splitlines() or [""])[0]


def parse(overrides: Sequence[str]) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise ConfigError(f"could not parse the overrides {' '.join(overrides)}: {first_line(e)} (grammar: "
                          "https://hydra.cc/docs/advanced/override_grammar/basic/)") from None


def jobs(overrides: list[str], parsed: list[Override], multirun: bool) -> list[list[str]]:
    """The overrides of each job: one job, or a multirun's (the basic sweeper's product of the swept values)."""
    if not multirun:
        return [list(overrides)]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    try:
        return BasicSweeper.split_arguments(parsed, None)[0]
    except HydraException as e:
        raise ConfigError(first_line(e)) from None


class Composer:
    """Composes configs (and reads the config groups) inside one Hydra initialization."""

    def __init__(self, config_name: str):
        from hydra.core.global_hydra import GlobalHydra

        self.config_name = config_name
        #: how the command line spells each key's value (a multirun's sweep, rather than one job's value)
        self.values: dict[str, str] = {}
        self.loader = GlobalHydra.instance().config_loader()

    def groups(self, parent: str = "") -> list[str]:
        return [g for g in self.loader.list_groups(parent) if g != "schema"]

    def options(self, group: str) -> list[str]:
        return list(self.loader.get_group_options(group))

    def compose(self, overrides: list[str], hydra: bool = False) -> DictConfig:
        from hydra import compose

        return compose(config_name=self.config_name, overrides=overrides, return_hydra_config=hydra)

    def job(self, overrides: list[str]) -> DictConfig:
        """The job's config, or the one-line error for why it does not compose."""
        try:
            cfg = self.compose(overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise self.explain(e, overrides) from None
        self.check_additions(cfg, overrides)
        return cfg

    # -- Hydra's errors, explained ------------------------------------------------------------------------------
    def explain(self, e: Exception, overrides: list[str]) -> ConfigError:
        msg = str(e)
        if isinstance(e, MissingConfigException) and (m := re.search(r"Could not find '([^']+)'", msg)):
            group, _, option = m.group(1).rpartition("/")
            options = list(e.options or [])
            where = re.match(r"In '([^']+)'", msg)
            inside = f" (in the defaults of {where.group(1)})" if where and where.group(1) != "config" else ""
            if not options:
                parent = group.rpartition("/")[0]
                return self.unknown_group(group, parent, option)
            found = close(option, options)
            hint = f" did you mean {group}={found[0]}?" if found else ""
            return UnknownKeyError(f"{group}={option} is not an option of {group}{inside}:{hint} its options: "
                                   f"{listing(options)}")
        if m := re.match(r"Could not override '([^']+)'", msg):
            return self.unknown_path(m.group(1), overrides)
        if m := re.match(r"Could not delete from config\. '([^']+)' does not exist", msg):
            return self.unknown_path(m.group(1), overrides)
        if m := re.match(r"Could not append to config\. An item is already at '([^']+)'", msg):
            return ConfigError(f"+{m.group(1)} adds a key the config already has: set it without the + "
                               f"({m.group(1)}=...)")
        if m := re.match(r"Ambiguous value for argument '(([^=']+)=([^']*))'", msg):
            return ConfigError(f"{m.group(1)} is ambiguous: for a list write {m.group(2)}=[{m.group(3)}], to sweep "
                               "over the values add -m (--multirun)")
        if (m := re.match(r"Error merging override (\S+)", msg)) and e.__cause__ is not None:
            return ConfigError(f"{m.group(1)} is invalid: {first_line(e.__cause__)}")
        cause = f" ({first_line(e.__cause__)})" if e.__cause__ is not None else ""
        return ConfigError(f"{first_line(e)}{cause}")

    def unknown_group(self, group: str, parent: str, value: str | None) -> UnknownKeyError:
        leaf = group.rpartition("/")[2]
        groups = self.groups(parent)
        found = close(leaf, groups)
        full = lambda g: f"{parent}/{g}" if parent else g  # noqa: E731
        hint = f" did you mean {full(found[0])}{'' if value is None else '=' + value}?" if found else ""
        return UnknownKeyError(f"{group} is not a config group:{hint} the groups"
                               f"{' of ' + parent if parent else ''}: {listing(full(g) for g in groups)}")

    def base(self, overrides: list[str], key: str) -> DictConfig:
        """The config without the overrides of ``key`` (what the bad key was meant to change), with Hydra's."""
        rest = [o for o in overrides if re.split(r"[=~+]", o.lstrip("~+"), maxsplit=1)[0] != key]
        for attempt in (rest, []):
            try:
                return self.compose(attempt, hydra=True)
            except (HydraException, OmegaConfBaseException):
                continue
        return OmegaConf.create({})

    def unknown_path(self, key: str, overrides: list[str]) -> ConfigError:
        """``key`` (``trainer.epoch``, ``datset``, ``hydra/launchr``) does not exist: the one-line error naming the
        node it is missing from and the closest key (or config group) there."""
        value = self.values.get(key, next((o.partition("=")[2] for o in overrides if "=" in o
                                           and o.lstrip("~+").partition("=")[0] == key), None))
        if "/" in key:
            return self.unknown_group(key, key.rpartition("/")[0], value)
        cfg = self.base(overrides, key)
        parts = key.split(".")
        node: Any = cfg
        for i, part in enumerate(parts):
            if isinstance(node, DictConfig) and part in node and i < len(parts) - 1:
                node = node[part]
                continue
            break
        prefix, bad, rest = parts[:i], parts[i], parts[i + 1:]
        keys = [str(k) for k in node] if isinstance(node, DictConfig) else []
        tail = "".join(f".{p}" for p in rest) + ("" if value is None else f"={value}")
        if not prefix:  # a top-level key: or a config group misspelt
            groups = self.groups()
            found = close(bad, [*groups, *keys])
            hint = f" did you mean {found[0]}{tail}?" if found else ""
            return UnknownKeyError(f"{bad} is not a config group or key:{hint} the groups: {listing(groups)}; "
                                   f"the keys: {listing(k for k in keys if k not in groups)}")
        owner = ".".join(prefix)
        choice = OmegaConf.select(cfg, f"hydra.runtime.choices.{prefix[0]}", default=None) if len(prefix) == 1 \
            else None
        found = close(bad, keys)
        hint = f" did you mean {owner}.{found[0]}{tail}?" if found else ""
        of = f"{owner} ({prefix[0]}={choice})" if choice else owner
        return UnknownKeyError(f"{owner}.{bad} is not a key of {of}:{hint} its keys: "
                               f"{listing(k for k in keys if not k.startswith('_'))}")

    def check_additions(self, cfg: DictConfig, overrides: list[str]) -> None:
        """A key added with ``+`` where nothing reads it (top level, ``paths``), or a key of a typed section
        (``query``, ``lds``, ...) that its schema does not have, is an error like a misspelt key."""
        sections = schema.sections()
        for name, cls in sections.items():
            known = {f.name for f in fields(cls)}
            if isinstance(cfg.get(name), DictConfig):
                for key in cfg[name]:
                    if key not in known:
                        raise unknown_key(f"{name}.{key}", name, known)
        groups = set(self.groups())
        base_keys: set[str] | None = None
        for o in parse(overrides):
            key = o.key_or_group
            if o.type != OverrideType.ADD or "/" in key or key.split(".")[0] in ("hydra", *sections) \
                    or key in groups:
                continue
            parent = key.rpartition(".")[0]
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if isinstance(node, DictConfig) and "_target_" not in node:  # nothing takes the key as an argument
                if base_keys is None:
                    base_keys = set(self.compose([]).keys())
                keys = [str(k) for k in node if str(k) != key.rpartition(".")[2]]
                if not parent:
                    found = close(key, [*groups, *base_keys])
                    hint = f" did you mean {found[0]}={o.get_value_element_as_str()}?" if found else ""
                    raise UnknownKeyError(f"+{key} adds a key nothing reads:{hint} the groups: {listing(groups)}; "
                                          f"the keys: {listing(k for k in base_keys if k not in groups)}")
                raise unknown_key(key, parent, keys, fix=f"nothing reads it (remove the + override of {key})")


def validate_job(cfg: DictConfig, sweep_dampings: list[Any]) -> None:
    """What the run checks before it reads or writes anything: the logger, then the whole config (its Context)."""
    from .pipeline import Context
    from .tracking import Tracker

    build(cfg.logger)
    Context(cfg, Path(tempfile.gettempdir()) / "influencelab-preflight", Tracker(backend="none"), sweep_dampings)


def check_command_line(argv: Sequence[str]) -> None:
    """Raise the one-line :class:`~influencelab.errors.ConfigError` a command line's config deserves, before Hydra
    writes anything (see the module doc). Errors other than the project's are left to the run to report."""
    from hydra import initialize_config_dir

    from .stages import load_all

    args = parse_args(argv)
    if args is None:
        return
    load_all()  # the stages' section schemas, registered as the app registers them
    schema.register()
    overrides = list(args.overrides)
    parsed = parse(overrides)
    schema.check_overrides(overrides)  # types of the typed sections, each value of a sweep too
    all_jobs = jobs(overrides, parsed, bool(args.multirun))
    if len(all_jobs) > MAX_CHECKED_JOBS:  # one job per combination of the swept config groups
        groups, seen = group_keys(parsed), {}
        for job in all_jobs:
            seen.setdefault(tuple(o for o in job if o.partition("=")[0].lstrip("+") in groups), job)
        all_jobs = list(seen.values())
    dampings = next((list(o.sweep_iterator()) for o in parsed
                     if o.key_or_group == "solver.damping" and o.is_discrete_sweep()), [])
    running = not args.cfg
    failures: list[str] = []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        composer = Composer(args.config_name or "config")
        composer.values = {o.key_or_group: (o.input_line or "").partition("=")[2] for o in parsed
                           if o.is_sweep_override()}
        for job in all_jobs:
            try:  # a job that does not compose would stop a sweep midway: an error whatever it is
                cfg = composer.job(job)
            except InfluenceLabError:
                raise
            except Exception:  # noqa: BLE001 (not a config error: the run reports it as it always has)
                return
            if not running:
                continue
            try:
                validate_job(cfg, dampings)
            except UnknownKeyError:
                raise
            except InfluenceLabError as e:
                if not args.multirun:
                    raise
                failures.append(str(e))
            except Exception:  # noqa: BLE001 (not a config error: the run reports it as it always has)
                return
    if failures and len(failures) == len(all_jobs):
        more = "" if len(set(failures)) == 1 else f" (and {len(set(failures)) - 1} other errors)"
        raise ConfigError(f"every job of the sweep is invalid: {failures[0]}{more}")


def group_keys(parsed: list[Override]) -> set[str]:
    """The keys of ``parsed`` that choose a config group option (``solver``, ``experiment``, ``hydra/launcher``)."""
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    return {o.key_or_group for o in parsed if "/" in o.key_or_group or o.key_or_group in groups}

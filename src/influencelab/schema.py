"""Typed schemas of the config sections the pipeline reads (``query``, ``score``, ``fit``; each stage module
declares its own, e.g. ``lds``), registered with Hydra's ConfigStore so composition type-checks them, and
instantiated (``__post_init__`` checks the values) before any data is read or anything is written.

A bad value gives one line naming the key, the value and the fix (:class:`~influencelab.errors.ConfigError`).

The dataclasses are the one definition of each section's defaults (``conf/config.yaml`` lists them as
``schema/<section>@<section>`` and repeats no value). This module reads the stage registry
(:mod:`influencelab.registry`) and never imports a stage module: the stages' schemas are there once the caller
has loaded them (:func:`influencelab.stages.load_all`, as the CLI does at import).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError, check
from .keys import unknown_key
from .registry import SECTIONS, STAGES
from .scores import parse_partition


@dataclass
class QueryConfig:
    """Query (test) points for pairwise scores: explicit test ``indices`` or ``n`` drawn with ``seed``
    (``conf/config.yaml`` sets it to the run's ``seed``)."""

    indices: list[int] | None = None
    n: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.n >= 1, "query.n", self.n, "must be >= 1")
        check(self.indices is None or len(self.indices) >= 1, "query.indices", self.indices,
              "give at least one test index, or null to draw query.n")


@dataclass
class ScoreConfig:
    """Score computation: batches, cached chunks, optional query compression, partitions, ensembles and the memory
    budget of a scoring pass (:mod:`influencelab.memory`)."""

    batch_size: int = 256
    chunk_size: int = 4096  # training points per chunk: chunks are written (and resumed) one by one
    query_rank: int | None = None  # low-rank compression of preconditioned queries (rank r) for many; null = exact
    partition: str | None = None  # "i/k": only the i-th of k parts (separate jobs); re-run without it to merge
    ensemble: int = 1  # average pairwise/self scores over k models trained with trainer.seed + 1000*i (cached)
    memory_gb: float | None = None  # GB a scoring pass may use (query chunks, batch); null = the device's free memory

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "score.batch_size", self.batch_size, "must be an integer >= 1")
        check(self.chunk_size >= 1, "score.chunk_size", self.chunk_size,
              "must be an integer >= 1 (training points per cached chunk)")
        check(self.query_rank is None or self.query_rank >= 1, "score.query_rank", self.query_rank,
              "must be an integer >= 1, or null for exact scores")
        check(self.ensemble >= 1, "score.ensemble", self.ensemble,
              "must be an integer >= 1 (number of independently trained models whose scores are averaged)")
        parse_partition(self.partition)
        check(self.memory_gb is None or self.memory_gb > 0, "score.memory_gb", self.memory_gb,
              "give the GB a scoring pass may use (a number > 0), or null for the memory the device has free")


@dataclass
class FitConfig:
    """Solver fitting: running sums are snapshotted to the cache at most every ``checkpoint_s`` seconds (0 = after
    every batch), so a fit killed midway resumes from its last snapshot with identical results. An iterative
    solver's long solve (LiSSA's recursion) snapshots at the same pace (or more rarely when its state is slow to
    write) and resumes likewise."""

    checkpoint_s: float = 30.0

    def __post_init__(self) -> None:
        check(self.checkpoint_s >= 0, "fit.checkpoint_s", self.checkpoint_s,
              "must be a number of seconds >= 0 (0 = snapshot after every batch)")


CORE: dict[str, type] = {"query": QueryConfig, "score": ScoreConfig, "fit": FitConfig}


def _expected(schema: type, name: str) -> str:
    for f in fields(schema):
        if f.name == name:
            return str(f.type)
    return "?"


def typed(node: Any, section: str, schema: type) -> Any:
    """``node`` (the config's ``section``) as an instance of the dataclass ``schema``: wrong types, unknown keys
    and bad values are one-line :class:`ConfigError`\\ s."""
    assert is_dataclass(schema)
    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    for key, value in data.items():
        type_check(section, key, value, schema)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))


def type_check(section: str, key: str, value: Any, schema: type) -> None:
    """One-line error unless ``key`` is a field of ``schema`` that accepts ``value``."""
    known = {f.name for f in fields(schema)}
    if key not in known:
        raise unknown_key(f"{section}.{key}", section, known)
    try:
        OmegaConf.merge(OmegaConf.structured(schema), {key: value})
    except OmegaConfBaseException:
        raise ConfigError(f"{section}.{key}={value!r} is invalid: expected {_expected(schema, key)}") from None


def sections() -> dict[str, type]:
    """Every section schema: the core ones and each registered stage module's (see the module doc)."""
    return {**CORE, **SECTIONS}


def register() -> None:
    """Store every section schema in Hydra's ConfigStore as ``schema/<section>`` (packaged at ``<section>``);
    ``conf/config.yaml`` lists them first in its defaults, so composition type-checks those sections (and takes
    their defaults from them). The stage modules must be loaded first (:func:`influencelab.stages.load_all`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, schema in sections().items():
        cs.store(group="schema", name=name, node=schema, package=name)


def check_overrides(overrides: list[str]) -> None:
    """Type-check command-line overrides of the schema'd sections (each value of a sweep too), so a wrong type is
    a one-line error (exit 2) rather than Hydra's multi-line composition error."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    schemas = sections()
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # Hydra reports malformed overrides itself
    for o in parsed:
        section, _, key = o.key_or_group.partition(".")
        if section not in schemas or not key or "." in key or o.is_delete():
            continue
        values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        for v in values:  # types only: a bad value of a sweep is that job's own one-line error
            type_check(section, key, v, schemas[section])


def validate(cfg: DictConfig, stages: list[str]) -> dict[str, Any]:
    """Typed objects of the core sections and of every section the selected ``stages`` read."""
    out = {name: typed(cfg.get(name, {}), name, schema) for name, schema in CORE.items()}
    for s in stages:
        st = STAGES[s]
        if st.section is not None and st.schema is not None and st.section not in out:
            out[st.section] = typed(cfg.get(st.section, {}), st.section, st.schema)
    return out

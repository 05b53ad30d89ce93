"""Experiment tracking: always plain files in the run directory, plus Weights & Biases when enabled.

``metrics.json`` is a flat dict with ``/``-namespaced keys (``train/test_accuracy``, ``time/train_s``),
rewritten atomically on every update; figures go to ``figures/<name>.png``. W&B runs offline by
default (no account needed), one run per Hydra job with the resolved config. A run is found by its group (the
sweep's, or the single run's, ``<date>/<time>`` folder), its name (the job's overrides), its tags and job type (the
experiment, dataset, model and solver choices); see :func:`run_info`. Score files are logged as artifacts named
per run (``pairwise-scores-<solver>-<run id>``) with their solver, dampings, dataset, model and sizes; the trained
model as a ``model`` artifact named by its cache key (the same weights are one artifact, whichever run logs them).
"""

from __future__ import annotations

import configparser
import io
import json
import logging
import netrc
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .cache import atomic_write_bytes, save_tensors
from .errors import ConfigError, CorruptFileError, check
from .files import read_json, writing

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"  # the train stage's weights, logged as a ``model`` artifact
WANDB_MODES = ("offline", "online", "disabled")
#: values of the WANDB_MODE environment variable (which overrides logger.mode) that W&B accepts
WANDB_ENV_MODES = ("offline", "online", "disabled", "dryrun", "run", "shared")
ONLINE_MODES = ("online", "run", "shared")
CHOICES = ("experiment", "dataset", "model", "solver")  # the Hydra choices that identify a run (tags, job type)
NOT_IN_NAME = ("logger", "paths", "hydra")  # override keys (and their subkeys) that do not name a run
RUN_DIR = "hydra.run.dir"  # the setting that moves a run's files elsewhere (named in a failed write's error)
MAX_NAME, MAX_TAG = 128, 64  # W&B rejects empty tags and tags over 64 characters; long names clutter the UI


@dataclass
class RunInfo:
    """How a W&B run is identified: ``name``, ``group``, ``tags``, ``job_type`` and the Hydra ``choices``."""

    name: str = "run"
    group: str | None = None
    tags: tuple[str, ...] = ()
    job_type: str | None = None
    choices: dict[str, str] = field(default_factory=dict)


def run_group(path: str | Path) -> str:
    """The W&B group of a sweep (or single run) directory: its last two parts, by default Hydra's ``<date>/<time>``
    (``multirun/2026-12-04/18-30-00`` -> ``2026-12-04/18-30-00``), so that sweeps of different days stay apart."""
    p = Path(path)
    return "/".join(part for part in p.parts[-2:] if part != p.anchor) or str(path)


def override_key(override: str) -> str:
    """The key of a command-line override: ``+solver.damping=1e-3`` -> ``solver.damping``, ``~query.n`` -> ``query.n``."""
    return override.split("=", 1)[0].lstrip("+~")


def run_name(overrides: Sequence[str], fallback: str, keys: Collection[str] | None = None,
             exclude: Collection[str] = ()) -> str:
    """A run's name from its overrides as typed: those of ``keys`` only (in a sweep: the swept ones, which tell its
    jobs apart) and none of ``exclude`` or :data:`NOT_IN_NAME` (nor their subkeys), comma-joined and cut to
    :data:`MAX_NAME` characters; ``fallback`` (the job number or run folder) when none is left."""
    def named(key: str) -> bool:
        top = key.split(".", 1)[0].split("/", 1)[0]
        return (keys is None or key in keys) and key not in exclude and top not in NOT_IN_NAME

    name = ",".join(o.lstrip("+") for o in overrides if named(override_key(o)))
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 1] + "…"
    return name or fallback


def run_info(hc: Any, stages: Sequence[str], swept: Collection[str] | None = None) -> RunInfo:
    """The W&B identity of a Hydra job (``hc``: ``HydraConfig.get()``): group from the sweep (multirun) or run
    directory (:func:`run_group`); name from the job's task overrides (:func:`run_name`; in a sweep only the
    ``swept`` keys, when known), else the job number (multirun) or run folder; tags ``<group>:<choice>`` of the
    experiment, dataset, model and solver choices (the solver only when a stage uses it); job type the
    experiment, else the solver, else ``train``."""
    multirun = hc.mode.name == "MULTIRUN"
    run_dir = Path(hc.runtime.output_dir)
    fallback = str(hc.job.num) if multirun else run_dir.name
    exclude = list(hc.job.config.override_dirname.exclude_keys or [])
    name = run_name(list(hc.overrides.task), fallback, set(swept) if multirun and swept else None, exclude)
    uses_solver = any(s != "train" for s in stages)
    choices = {k: str(v) for k, v in hc.runtime.choices.items()
               if k in CHOICES and v is not None and (k != "solver" or uses_solver)}
    tags = tuple(f"{k}:{choices[k]}"[:MAX_TAG] for k in CHOICES if k in choices)
    job_type = choices.get("experiment") or choices.get("solver") or "train"
    return RunInfo(name, run_group(hc.sweep.dir if multirun else run_dir), tags, job_type[:MAX_TAG], choices)


def wandb_logged_in() -> bool:
    """Whether W&B credentials are configured, looked up (without the network) where ``wandb.init`` looks:
    ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, an ``api_key`` in W&B's settings files, or a ``.netrc``
    entry for the W&B host (``WANDB_BASE_URL``, the settings' ``base_url`` or api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    settings = configparser.ConfigParser(interpolation=None)
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb").expanduser()
    try:
        settings.read([config_dir / "settings", Path("wandb") / "settings"])
    except configparser.Error:
        pass
    if settings.get("default", "api_key", fallback=None):
        return True
    base = os.environ.get("WANDB_BASE_URL") or settings.get("default", "base_url", fallback="https://api.wandb.ai")
    host = urlsplit(base).hostname or base
    paths = [Path(os.environ["NETRC"]).expanduser()] if os.environ.get("NETRC") else \
        [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()]
    for path in paths:
        try:
            if path.exists() and netrc.netrc(str(path)).authenticators(host) is not None:
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def require_wandb(mode: str, source: str) -> None:
    """One-line errors, before anything runs, for a W&B run that could not start: wandb missing (or broken), or
    an online ``mode`` (set by ``source``) without a W&B login."""
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        if e.name == "wandb":
            raise ConfigError("logger=wandb needs the wandb package, which is not installed: pip install wandb, "
                              "or run without W&B (logger=none)") from None
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"logger=wandb: the wandb package fails to import ({reason}): reinstall it "
                          "(pip install -U wandb), or run without W&B (logger=none)") from None
    if mode in ONLINE_MODES and not wandb_logged_in():
        offline = "WANDB_MODE=offline" if source == "WANDB_MODE" else "logger.mode=offline or WANDB_MODE=offline"
        raise ConfigError(f"{source}={mode} needs a W&B login and none was found: run `wandb login` (or set "
                          f"WANDB_API_KEY), or log offline ({offline})")


def sanitize(text: str) -> str:
    """``text`` in the characters W&B allows in artifact names (letters, digits, ``-``, ``_``, ``.``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def scores_metadata(path: Path) -> dict[str, Any]:
    """What a score file written by :meth:`~influencelab.pipeline.Context.save_scores` says about itself: its
    metadata (``solver``, ``dampings``, ``ensemble``, ``convergence``) and sizes (``n_train``, ``n_query``);
    ``{}`` for any other file."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta: dict[str, Any] = dict(f.metadata() or {})
        shape = f.get_slice("scores").get_shape() if "scores" in f.keys() else []
    for key in ("dampings", "convergence", "ensemble"):
        if key in meta:
            try:
                meta[key] = json.loads(meta[key])
            except ValueError:
                pass
    if shape:
        meta["n_train"] = int(shape[-1])
    if len(shape) == 2:
        meta["n_query"] = int(shape[0])
    return meta


class Tracker:
    """Writes metrics/figures/tables to the run dir and mirrors them to W&B (``backend: wandb``). With W&B on
    (``mode``, or the ``WANDB_MODE`` environment variable, not ``disabled``), a missing wandb package or an online
    mode without a login is a one-line error here, before the run reads or writes anything."""

    def __init__(self, backend: str = "wandb", mode: str = "offline", project: str = "influencelab",
                 entity: str | None = None, tags: list[str] | None = None):
        check(backend in ("wandb", "none"), "logger.backend", backend, "use wandb or none")
        check(mode in WANDB_MODES, "logger.mode", mode, "use offline, online or disabled")
        self.tags = [str(t) for t in tags or []]
        bad = [t for t in self.tags if not 0 < len(t) <= MAX_TAG]
        check(not bad, "logger.tags", bad, f"W&B tags have 1 to {MAX_TAG} characters")
        env = os.environ.get("WANDB_MODE")
        check(not env or env in WANDB_ENV_MODES, "WANDB_MODE", env, "use offline, online or disabled")
        self.backend, self.mode, self.project, self.entity = backend, mode, project, entity
        self.run_dir: Path | None = None
        self.metrics: dict[str, Any] = {}
        self.config: dict[str, Any] = {}
        self.info = RunInfo()
        self._wandb = None
        if backend == "wandb" and self.wandb_mode != "disabled":
            require_wandb(self.wandb_mode, "WANDB_MODE" if env else "logger.mode")

    @property
    def wandb_mode(self) -> str:
        """The W&B mode in effect: ``WANDB_MODE`` when set, else ``logger.mode``."""
        return os.environ.get("WANDB_MODE") or self.mode

    def start(self, run_dir: Path, config: dict[str, Any], name: str | RunInfo, group: str | None = None) -> None:
        """Open the run: loads existing metrics.json (re-runs extend it) and starts W&B if enabled, identified by
        ``name`` (a :class:`RunInfo`, or a plain name and ``group``)."""
        self.run_dir = Path(run_dir)
        self.config = config
        self.info = name if isinstance(name, RunInfo) else RunInfo(name, group)
        with writing(self.run_dir / "figures", where=RUN_DIR):
            (self.run_dir / "figures").mkdir(parents=True, exist_ok=True)
        mpath = self.run_dir / "metrics.json"
        if mpath.exists():
            try:
                self.metrics = read_json(mpath)
            except CorruptFileError as e:  # this run rewrites it; earlier stages' metrics are lost
                log.warning("%s is %s: starting it afresh (rerun earlier stages for their metrics)", mpath,
                            getattr(e, "cause", "unreadable"))
        mode = self.wandb_mode
        if self.backend == "wandb" and mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            info = self.info
            tags = list(dict.fromkeys([*info.tags, *self.tags]))
            self._wandb = wandb.init(project=self.project, entity=self.entity, mode=mode, dir=str(self.run_dir),
                                     config=config, name=info.name, group=info.group, tags=tags,
                                     job_type=info.job_type, reinit="finish_previous")

    def log(self, metrics: dict[str, Any]) -> None:
        """Record scalar metrics (flat, ``/``-namespaced)."""
        self.metrics.update(metrics)
        self._flush()
        if self._wandb is not None:
            self._wandb.log(metrics)
            for k, v in metrics.items():
                self._wandb.summary[k] = v

    def figure(self, name: str, fig: Any) -> Path:
        """Save a matplotlib figure as ``figures/<name>.png`` (and to W&B as an image)."""
        import matplotlib.pyplot as plt

        if self.run_dir is None:  # not started (a non-zero rank): nothing is written
            plt.close(fig)
            return Path(os.devnull)
        path = self.run_dir / "figures" / f"{name}.png"
        buf = io.BytesIO()  # rendered in memory, then written atomically (no half-written image)
        try:
            fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        finally:
            plt.close(fig)
        atomic_write_bytes(path, buf.getvalue(), where=RUN_DIR)
        if self._wandb is not None:
            import wandb

            self._wandb.log({f"figures/{name}": wandb.Image(str(path))})
        return path

    def table(self, name: str, columns: list[str], rows: list[list[Any]], line_x: str | None = None) -> None:
        """A small table: written as ``<name>.csv`` in the run dir and logged to W&B as a Table; with ``line_x``
        (a column), a curve: also a W&B line chart of every other column against it."""
        if self.run_dir is None:
            return
        lines = [",".join(columns)] + [",".join(str(v) for v in r) for r in rows]
        atomic_write_bytes(self.run_dir / f"{name.replace('/', '_')}.csv", ("\n".join(lines) + "\n").encode(),
                           where=RUN_DIR)
        if self._wandb is not None:
            import wandb

            logged: dict[str, Any] = {name: wandb.Table(columns=columns, data=rows)}
            if line_x is not None:
                cols = list(zip(*rows))  # column-wise values
                ys = [c for c in columns if c != line_x]
                logged[f"{name}_plot"] = wandb.plot.line_series(
                    xs=list(cols[columns.index(line_x)]), ys=[list(cols[columns.index(c)]) for c in ys], keys=ys,
                    title=name, xname=line_x)
            self._wandb.log(logged)

    def artifact(self, name: str, path: Path, kind: str = "scores", metadata: dict[str, Any] | None = None) -> None:
        """Attach a file (e.g. a score file) to the W&B run as an artifact of its own, ``<name>-<solver>-<run id>``,
        with metadata: the run's dataset, model, name and group, what a score file says about itself
        (:func:`scores_metadata`: solver, dampings, n_train, n_query, ...) and ``metadata``."""
        if self._wandb is None:
            return
        meta = {**self._identity(), **scores_metadata(Path(path)), **(metadata or {})}
        solver = meta.get("solver") or self.info.choices.get("solver")
        full = "-".join(sanitize(str(p)) for p in (name, solver, self._wandb.id) if p)
        self._log_artifact(full[:128], kind, Path(path), meta)

    def save_tensors(self, relpath: str, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
        """Atomically write a safetensors file under the run dir; the trained model (:data:`MODEL_FILE`) is also
        logged to W&B as a ``model`` artifact (:meth:`model_artifact`)."""
        if self.run_dir is None:
            return Path(os.devnull)
        path = self.run_dir / relpath
        save_tensors(path, tensors, metadata, where=RUN_DIR)
        if relpath == MODEL_FILE:
            self.model_artifact(path, (metadata or {}).get("model_key"))
        return path

    def model_artifact(self, path: Path, model_key: str | None = None) -> None:
        """Log trained weights as a ``model`` artifact ``model-<model>-<dataset>-<key>``: named by the model's cache
        key, so the same weights (a cached model reused across a sweep) are one artifact, not one per run; its
        metadata: the model, dataset and trainer configs, the key, n_train and the test accuracy."""
        if self._wandb is None:
            return
        ident = self._identity()
        meta = {"model": ident.get("model"), "dataset": ident.get("dataset"), "model_key": model_key,
                "config": {k: self.config.get(k) for k in ("model", "dataset", "trainer")},
                "n_train": self.metrics.get("train/n_train"), "test_accuracy": self.metrics.get("train/test_accuracy")}
        suffix = model_key[:12] if model_key else self._wandb.id
        full = "-".join(sanitize(str(p)) for p in ("model", meta["model"], meta["dataset"], suffix) if p)
        self._log_artifact(full[:128], "model", Path(path), {k: v for k, v in meta.items() if v is not None})

    def finish(self) -> None:
        self._flush()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def _identity(self) -> dict[str, Any]:
        """The run's dataset and model (Hydra choices, else from the config), name and group: artifact metadata."""
        dataset = self.info.choices.get("dataset") or (self.config.get("dataset") or {}).get("name")
        target = str((self.config.get("model") or {}).get("_target_", ""))
        model = self.info.choices.get("model") or target.rsplit(".", 1)[-1] or None
        out = {"dataset": dataset, "model": model, "run_name": self.info.name, "group": self.info.group}
        return {k: v for k, v in out.items() if v is not None}

    def _log_artifact(self, name: str, kind: str, path: Path, metadata: Mapping[str, Any]) -> None:
        import wandb

        art = wandb.Artifact(name, type=kind, metadata=dict(metadata))
        art.add_file(str(path))
        self._wandb.log_artifact(art)

    def _flush(self) -> None:
        if self.run_dir is not None:
            blob = json.dumps(self.metrics, indent=2, sort_keys=True, default=float)
            atomic_write_bytes(self.run_dir / "metrics.json", (blob + "\n").encode(), where=RUN_DIR)

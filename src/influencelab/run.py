"""``load_run(run_dir)``: a finished run's model, data, config, metrics and scores, for notebooks and stages. A
sweep's jobs, read without loading any model or data, are :mod:`influencelab.sweeps`'s."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from torch import nn

from .data.base import LabeledData
from .errors import InfluenceLabError
from .files import read_json, read_tensors, rerun_command

log = logging.getLogger("influencelab")


@dataclass
class Run:
    """Everything a run directory holds, loaded. Scores load lazily (``None`` if the stage did not run)."""

    run_dir: Path
    config: DictConfig
    model: nn.Module
    train: LabeledData
    test: LabeledData
    metrics: dict[str, Any]
    _scores: dict[str, dict[str, torch.Tensor] | None] = field(default_factory=dict, repr=False)

    @property
    def flipped(self) -> torch.Tensor:
        """Mask of training points whose label was flipped by ``dataset.label_noise``."""
        return self.train.flipped

    def scores(self, name: str) -> dict[str, torch.Tensor] | None:
        """All tensors of ``scores/<name>.safetensors`` plus ``dampings`` (from its metadata)."""
        if name not in self._scores:
            path = self.run_dir / "scores" / f"{name}.safetensors"
            if not path.exists():
                self._scores[name] = None
            else:
                tensors, meta = read_tensors(path, rerun_command(self.run_dir))
                out: dict[str, Any] = dict(tensors)
                out["dampings"] = json.loads(meta.get("dampings", "[]"))
                out["solver"] = meta.get("solver")
                self._scores[name] = out
        return self._scores[name]

    def by_damping(self, name: str) -> torch.Tensor | None:
        """``scores/<name>.safetensors``'s scores with the damping axis first, ``[n_damping, ...]`` whatever the
        number of dampings (the shape of the :class:`~influencelab.api.Attributor`'s ``pairwise`` and
        ``self_influence``); runs written before the files always held ``scores_by_damping``: one damping."""
        s = self.scores(name)
        if s is None:
            return None
        return s["scores_by_damping"] if "scores_by_damping" in s else s["scores"].unsqueeze(0)

    @property
    def pairwise_scores(self) -> torch.Tensor | None:
        """``[n_query, n_train]``: the first damping's (:attr:`pairwise_by_damping` has every damping); query/train
        indices in ``scores('pairwise')``."""
        s = self.scores("pairwise")
        return None if s is None else s["scores"]

    @property
    def pairwise_by_damping(self) -> torch.Tensor | None:
        """``[n_damping, n_query, n_train]``, like ``attributor().pairwise(queries)``."""
        return self.by_damping("pairwise")

    @property
    def self_scores(self) -> torch.Tensor | None:
        """``[n_train]`` self-influence: the first damping's (:attr:`self_by_damping` has every damping)."""
        s = self.scores("self")
        return None if s is None else s["scores"]

    @property
    def self_by_damping(self) -> torch.Tensor | None:
        """``[n_damping, n_train]``, like ``attributor().self_influence()``."""
        return self.by_damping("self")


    def attributor(self, solver: str | None = None, cache_dir: str | None = None, **solver_args: Any):
        """An :class:`~influencelab.api.Attributor` of the run's model, fitted on its training data with the run's
        solver config (or the ``solver`` group's ``solver`` with the run's seed and modules), reusing the run's
        cached factors (``paths.cache`` of its config, or ``cache_dir``)."""
        from .api import Attributor
        from .compose import build, solver_node

        node = self.config.solver
        if solver is not None:
            node = solver_node(solver, {"modules": node.get("modules", "all"), **solver_args},
                               seed=int(self.config.seed))
        elif solver_args:
            node = OmegaConf.merge(node, solver_args)
        model_key = self._model_key()
        self._attach_checkpoints(model_key, cache_dir or self.config.paths.cache)
        task = build(self.config.task) if self.config.get("task") is not None else None  # (older runs: none)
        attr = Attributor(self.model, task=task, solver=build(node, device=str(next(self.model.parameters()).device)),
                          cache_dir=cache_dir or self.config.paths.cache, model_key=model_key)
        return attr.fit(self.train, data_key=build(self.config.dataset).cache_key())

    def _attach_checkpoints(self, model_key: str, cache_dir: str | Path) -> None:
        """The training checkpoints the run's trainer saved (``trainer.checkpoints=N``, for ``solver=tracin``), from
        the run's cached model entry (``model.safetensors`` holds the final weights only), attached to the model;
        a run trained without them, or whose entry is gone, gets none (TracIn then says how to get them)."""
        from .cache import Cache
        from .train import get_checkpoints, set_checkpoints, split_checkpoints

        n = self.config.get("trainer", {}).get("checkpoints") or 0
        if not n or get_checkpoints(self.model):
            return
        hit = Cache(cache_dir).get("models", model_key)
        if hit is None:
            log.warning("%s was trained with trainer.checkpoints=%d but its cached model entry %s is not in %s: "
                        "rerun it with the same cache to get them back", self.run_dir, n, model_key, cache_dir)
            return
        state, checkpoints = split_checkpoints(hit[0])
        device = next(self.model.parameters()).device
        for c in checkpoints:
            c.state.update({k: v.to(device) for k, v in c.state.items()})
        set_checkpoints(self.model, checkpoints)

    def _model_key(self) -> str:
        from .artifacts import model_digest

        path = self.run_dir / "model.safetensors"
        with safe_open(str(path), "pt") as f:
            key = (f.metadata() or {}).get("model_key")
        return key or model_digest(self.model)

    def influence(self, test_positions: list[int] | torch.Tensor, solver: str | None = None) -> torch.Tensor:
        """Scores ``[k, n_train]`` of any test images (positions in ``run.test``) against every training point,
        with the run's solver (or ``solver``, a name in conf/solver/) at its first damping, reusing its cached
        factors: the same scoring path as the CLI's pairwise stage (the Python API)."""
        attr = self.attributor(solver)
        queries = self.test.subset(torch.as_tensor(test_positions).long())
        return attr.pairwise(queries, dampings=attr.dampings[:1])[0]


def load_run(run_dir: str | Path, device: str = "cpu") -> Run:
    """Load a run directory written by ``influencelab`` (the model in eval mode on ``device``)."""
    from .compose import build

    run_dir = Path(run_dir)
    cfg_path = run_dir / ".hydra" / "config.yaml"
    weights = run_dir / "model.safetensors"
    if not cfg_path.exists():
        raise InfluenceLabError(f"{run_dir} is not an influencelab run directory (no .hydra/config.yaml)")
    if not weights.exists():
        raise InfluenceLabError(f"{run_dir} has no model.safetensors: run it with the train stage first")
    cfg = OmegaConf.load(cfg_path)
    spec = build(cfg.dataset)
    train, test = spec.load()
    model = build(cfg.model)
    model.load_state_dict(read_tensors(weights, rerun_command(run_dir))[0])
    model.to(device).eval()
    mpath = run_dir / "metrics.json"
    metrics = read_json(mpath, rerun_command(run_dir)) if mpath.exists() else {}
    return Run(run_dir, cfg, model, train, test, metrics)

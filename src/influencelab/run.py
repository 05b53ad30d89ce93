"""``load_run(run_dir)``: a finished run's model, data, config, metrics and scores, for notebooks and stages."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .data.base import LabeledData
from .errors import InfluenceLabError


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
                out: dict[str, Any] = load_file(str(path))
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                out["dampings"] = json.loads(meta.get("dampings", "[]"))
                out["solver"] = meta.get("solver")
                self._scores[name] = out
        return self._scores[name]

    @property
    def pairwise_scores(self) -> torch.Tensor | None:
        """``[n_query, n_train]`` (first damping); query/train indices in ``scores('pairwise')``."""
        s = self.scores("pairwise")
        return None if s is None else s["scores"]

    @property
    def self_scores(self) -> torch.Tensor | None:
        """``[n_train]`` self-influence (first damping)."""
        s = self.scores("self")
        return None if s is None else s["scores"]


    def influence(self, test_positions: list[int] | torch.Tensor, solver: str | None = None) -> torch.Tensor:
        """Scores ``[k, n_train]`` of any test images (positions in ``run.test``) against every training point,
        with the run's solver (or ``solver``, a name in conf/solver/), reusing its cached factors."""
        from .pipeline import Context
        from .scores import precondition_queries, query_gradients

        cfg = self.config.copy()
        if solver is not None:
            cfg.solver = OmegaConf.load(Path(__file__).parent / "conf" / "solver" / f"{solver}.yaml")
        ctx = Context(cfg, self.run_dir)
        ctx.__dict__.update(model=self.model, data=(self.train, self.test))  # the run's own weights and data
        s = ctx.solver
        model = ctx.influence_model(s)
        queries = ctx.test_data.subset(torch.as_tensor(test_positions).long())
        pre = precondition_queries(s, query_gradients(s, model, queries, 64), s.dampings[:1])
        cols = [s.pairwise(model, pre, x, y).detach().cpu() for x, y, _ in ctx.train_data.batches(256)]
        return torch.cat(cols, dim=1)


def load_run(run_dir: str | Path, device: str = "cpu") -> Run:
    """Load a run directory written by ``influencelab`` (the model in eval mode on ``device``)."""
    from .pipeline import build

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
    model.load_state_dict(load_file(str(weights)))
    model.to(device).eval()
    mpath = run_dir / "metrics.json"
    metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
    return Run(run_dir, cfg, model, train, test, metrics)
